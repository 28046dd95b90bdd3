"""Open Inference Protocol v2 over gRPC: ``inference.GRPCInferenceService`` on its own port (9000 by
default, env ``SUITE_GRPC_PORT``; host from ``SUITE_GRPC_HOST``, default 0.0.0.0), a ``grpc.aio``
server running in the ``Suite`` worker's event loop, started/stopped by ``Suite``'s lifecycle hooks.

The protocol is not restated here: the message classes and the service stub/servicer are the
generated modules that ``tritonclient`` ships (``tritonclient.grpc.service_pb2``,
``tritonclient.grpc.service_pb2_grpc``, built from Triton's ``grpc_service.proto`` and
``model_config.proto``), so serving needs ``tritonclient[grpc]``.

Implemented: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer (typed
``contents`` and ``raw_input_contents`` in; ``raw_output_contents`` out). Everything else answers
UNIMPLEMENTED (the generated servicer's default)."""

from __future__ import annotations

import logging
import os
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from services.errors import RequestError
from services.oip.core import OipCore, numpy_dtype, oip_datatype, tensor_from_list, tensor_from_raw, tensor_to_raw

log = logging.getLogger("services.oip.grpc")
DEFAULT_PORT = 9000
MAX_MESSAGE = 64 * 1024 * 1024
CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND, 503: grpc.StatusCode.UNAVAILABLE}

# Typed ``InferTensorContents`` field per datatype (FP16 has none: raw only).
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
            "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def grpc_port() -> int:
    return int(os.environ.get("SUITE_GRPC_PORT", str(DEFAULT_PORT)))


def parameter_value(p: pb.InferParameter) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


def decode_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    if not request.inputs:
        raise RequestError("inputs", "must be a non-empty list of tensors")
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise RequestError("raw_input_contents", f"{len(raw)} given for {len(request.inputs)} inputs; "
                                                 f"either all inputs are raw or none")
    feeds = {}
    for i, tensor in enumerate(request.inputs):
        name = tensor.name
        if name in feeds:
            raise RequestError(name, "input given twice")
        if raw:
            feeds[name] = tensor_from_raw(name, tensor.datatype, list(tensor.shape), raw[i])
        else:
            numpy_dtype(name, tensor.datatype)
            field = CONTENTS.get(tensor.datatype)
            if field is None:
                raise RequestError(name, f"datatype {tensor.datatype} needs raw_input_contents")
            feeds[name] = tensor_from_list(name, tensor.datatype, list(tensor.shape),
                                           list(getattr(tensor.contents, field)))
    return feeds


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, oip: OipCore):
        self.oip = oip

    async def _fail(self, context: grpc.aio.ServicerContext, exc: RequestError):
        await context.abort(CODES.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT), str(exc))

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.oip.ready())

    async def ModelReady(self, request, context):
        try:
            return pb.ModelReadyResponse(ready=self.oip.model_ready(request.name, request.version or None))
        except RequestError as exc:
            await self._fail(context, exc)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(**self.oip.server_metadata())

    async def ModelMetadata(self, request, context):
        try:
            meta = self.oip.model_metadata(request.name, request.version or None)
        except RequestError as exc:
            await self._fail(context, exc)
            return
        tensors = lambda items: [pb.ModelMetadataResponse.TensorMetadata(**t) for t in items]  # noqa: E731
        return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                        inputs=tensors(meta["inputs"]), outputs=tensors(meta["outputs"]))

    async def ModelInfer(self, request, context):
        try:
            feeds = decode_inputs(request)
            params = {k: parameter_value(v) for k, v in request.parameters.items()}
            requested = [o.name for o in request.outputs] or None
            version, outputs, out_params = await self.oip.infer(request.model_name, request.model_version or None,
                                                                feeds, params, requested)
        except RequestError as exc:
            await self._fail(context, exc)
            return
        except Exception as exc:
            log.exception("Open Inference Protocol gRPC ModelInfer failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
            return
        response = pb.ModelInferResponse(model_name=request.model_name, model_version=version, id=request.id)
        for name, array in outputs.items():
            response.outputs.add(name=name, datatype=oip_datatype(array.dtype), shape=list(array.shape))
            response.raw_output_contents.append(tensor_to_raw(array))
        for key, value in out_params.items():
            p = response.parameters[key]
            if isinstance(value, bool):
                p.bool_param = value
            elif isinstance(value, int):
                p.int64_param = value
            elif isinstance(value, float):
                p.double_param = value
            elif value is not None:
                p.string_param = str(value)
        return response


class GrpcFrontend:
    """The gRPC server's lifecycle. Binding without SO_REUSEPORT, so a leftover process on the port is
    an error, not a silent share: ``start`` logs it at ERROR level and records the outcome in
    ``oip.grpc_up`` / ``oip.grpc_error``, which readiness reports (REST /v2/health/ready 503). It does
    not raise: a raising startup hook makes BentoML respawn the worker in a tight loop."""

    def __init__(self, oip: OipCore, port: int | None = None, host: str | None = None):
        self.oip = oip
        self.port = grpc_port() if port is None else port
        self.host = host or os.environ.get("SUITE_GRPC_HOST", "0.0.0.0")
        self.server: grpc.aio.Server | None = None

    async def start(self) -> None:
        server = grpc.aio.server(options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ])
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(self.oip), server)
        address = f"{self.host}:{self.port}"
        try:
            bound = server.add_insecure_port(address)
            if not bound:
                raise RuntimeError(f"could not bind {address}")
            await server.start()
        except Exception as exc:
            self.oip.grpc_up, self.oip.grpc_error = False, f"gRPC server failed to start on {address}: {exc}"
            log.error("%s -- is another process on the port? The server stays up without gRPC and "
                      "reports not ready (REST /v2/health/ready answers 503).", self.oip.grpc_error)
            await server.stop(None)
            return
        self.server = server
        self.oip.grpc_up, self.oip.grpc_error = True, None
        log.info("Open Inference Protocol gRPC server listening on %s", address)

    async def stop(self, grace: float = 5.0) -> None:
        self.oip.grpc_up, self.oip.grpc_error = False, "stopped"
        if self.server is not None:
            await self.server.stop(grace)
            self.server = None
            log.info("Open Inference Protocol gRPC server stopped")
