"""Open Inference Protocol v2 over gRPC: ``inference.GRPCInferenceService`` on its own port (9000 by
default), a ``grpc.aio`` server in each worker's event loop over the data plane.

The protocol is not restated here: messages and the servicer base are the generated modules that
``tritonclient`` ships (built from Triton's ``grpc_service.proto``), so serving needs
``tritonclient[grpc]``. Every worker binds the port with SO_REUSEPORT and the kernel spreads the
connections over them.

Implemented: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer (typed
``contents`` and ``raw_input_contents`` in; ``raw_output_contents`` out), ModelStreamInfer
(decoupled: text arrives chunk by chunk, as ``tritonclient.grpc``'s ``start_stream`` /
``async_stream_infer`` expect) and the model repository extension (RepositoryIndex,
RepositoryModelLoad with an optional ``version`` parameter, RepositoryModelUnload). The rest answers
UNIMPLEMENTED (the generated servicer's default)."""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from services.errors import ServingError, bad_request
from services.frontends.oip_codec import numpy_dtype, oip_datatype, tensor_from_list, tensor_from_raw, tensor_to_raw

log = logging.getLogger("services.frontends.grpc")
MAX_MESSAGE = 64 * 1024 * 1024
FINAL, EMPTY_FINAL = "triton_final_response", "triton_enable_empty_final_response"  # Triton's decoupled-model parameters
CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED, 404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.INVALID_ARGUMENT,
         415: grpc.StatusCode.INVALID_ARGUMENT, 500: grpc.StatusCode.INTERNAL, 503: grpc.StatusCode.UNAVAILABLE}

# Typed ``InferTensorContents`` field per datatype (FP16 has none: raw only).
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
            "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def parameter_value(p: pb.InferParameter) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


def decode_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    if not request.inputs:
        raise bad_request("inputs", "must be a non-empty list of tensors")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise bad_request("raw_input_contents", f"{len(raw)} given for {len(request.inputs)} inputs; "
                                                f"either all inputs are raw or none")
    feeds = {}
    for i, tensor in enumerate(request.inputs):
        name = tensor.name
        if name in feeds:
            raise bad_request(name, "input given twice")
        if raw:
            feeds[name] = tensor_from_raw(name, tensor.datatype, list(tensor.shape), raw[i])
        else:
            numpy_dtype(name, tensor.datatype)
            field = CONTENTS.get(tensor.datatype)
            if field is None:
                raise bad_request(name, f"datatype {tensor.datatype} needs raw_input_contents")
            feeds[name] = tensor_from_list(name, tensor.datatype, list(tensor.shape),
                                           list(getattr(tensor.contents, field)))
    return feeds


def set_parameter(p: pb.InferParameter, value: Any) -> None:
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    elif value is not None:
        p.string_param = str(value)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: Any, metrics: Any = None):
        self.plane = plane
        self.metrics = metrics

    async def _fail(self, context: grpc.aio.ServicerContext, exc: ServingError):
        await context.abort(CODES.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT), str(exc))

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.plane.ready())

    async def ModelReady(self, request, context):
        try:
            return pb.ModelReadyResponse(ready=self.plane.model_ready(request.name, request.version or None))
        except ServingError as exc:
            await self._fail(context, exc)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(**self.plane.server_metadata())

    async def ModelMetadata(self, request, context):
        try:
            meta = self.plane.model_metadata(request.name, request.version or None)
        except ServingError as exc:
            await self._fail(context, exc)
            return
        tensors = lambda items: [pb.ModelMetadataResponse.TensorMetadata(**t) for t in items]  # noqa: E731
        return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                        inputs=tensors(meta["inputs"]), outputs=tensors(meta["outputs"]))

    async def RepositoryIndex(self, request, context):
        entries = self.plane.repository_index(ready_only=request.ready)
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**e) for e in entries])

    async def RepositoryModelLoad(self, request, context):
        try:
            unknown = [k for k in request.parameters if k != "version"]
            if unknown:
                raise bad_request(unknown[0], "the only load parameter is version (a stored version to pin)")
            version = request.parameters["version"].string_param if "version" in request.parameters else None
            await self.plane.load_model(request.model_name, version)
        except ServingError as exc:
            await self._fail(context, exc)
            return
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        try:
            await self.plane.unload_model(request.model_name)
        except ServingError as exc:
            await self._fail(context, exc)
            return
        return pb.RepositoryModelUnloadResponse()

    async def ModelInfer(self, request, context):
        status = 200
        try:
            refusal = self.plane.admission_error(request.model_name)  # before decoding the tensors
            if refusal is not None:
                raise refusal
            feeds = decode_inputs(request)
            params = {k: parameter_value(v) for k, v in request.parameters.items()}
            requested = [o.name for o in request.outputs] or None
            result = await self.plane.infer(request.model_name, request.model_version or None, feeds, params, requested)
        except ServingError as exc:
            status = exc.status
            await self._fail(context, exc)
            return
        except Exception:
            status = 500
            log.exception("Open Inference Protocol gRPC ModelInfer failed")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; the server log has the details")
            return
        finally:
            if self.metrics is not None:
                self.metrics.request(request.model_name, "oip_grpc", status)
        return infer_response(request, result)

    async def ModelStreamInfer(self, request_iterator, context):
        """Decoupled inference (Triton's convention): every request on the stream is served
        concurrently; a text model answers with one response per chunk of text, others with one.
        Each response carries ``triton_final_response``; a request with
        ``triton_enable_empty_final_response`` gets its data responses marked not final and then an
        empty final one. A failed request answers ``error_message`` and the stream goes on. When the
        client cancels the stream, its generations stop."""
        queue: asyncio.Queue = asyncio.Queue()
        serving: set[asyncio.Task] = set()
        read_all = object()

        async def serve(request: pb.ModelInferRequest) -> None:
            status = 200
            try:
                feeds = decode_inputs(request)
                params = {k: parameter_value(v) for k, v in request.parameters.items()}
                empty_final = bool(params.pop(EMPTY_FINAL, False))
                results = await self.plane.infer_stream(request.model_name, request.model_version or None, feeds, params)
                async for result in results:
                    response = infer_response(request, result)
                    set_parameter(response.parameters[FINAL], result.final and not empty_final)
                    queue.put_nowait(pb.ModelStreamInferResponse(infer_response=response))
                if empty_final:
                    response = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
                    set_parameter(response.parameters[FINAL], True)
                    queue.put_nowait(pb.ModelStreamInferResponse(infer_response=response))
            except ServingError as exc:
                status = exc.status
                queue.put_nowait(pb.ModelStreamInferResponse(error_message=str(exc)))
            except Exception:
                status = 500
                log.exception("Open Inference Protocol gRPC ModelStreamInfer failed")
                queue.put_nowait(pb.ModelStreamInferResponse(error_message="internal error; the server log has the details"))
            finally:
                if self.metrics is not None:
                    self.metrics.request(request.model_name, "oip_grpc_stream", status)

        async def read() -> None:
            async for request in request_iterator:
                task = asyncio.ensure_future(serve(request))
                serving.add(task)
                task.add_done_callback(lambda t: (serving.discard(t), queue.put_nowait(None)))
            queue.put_nowait(read_all)

        reader = asyncio.ensure_future(read())
        try:
            reading = True
            while reading or serving:
                item = await queue.get()
                if item is read_all:
                    reading = False
                elif item is not None:
                    yield item
        finally:
            reader.cancel()
            for task in list(serving):
                task.cancel()


def infer_response(request: pb.ModelInferRequest, result: Any) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=result.model, model_version=result.version, id=request.id)
    for name, array in result.outputs.items():
        response.outputs.add(name=name, datatype=oip_datatype(array.dtype), shape=list(array.shape))
        response.raw_output_contents.append(tensor_to_raw(array))
    for key, value in result.parameters.items():
        set_parameter(response.parameters[key], value)
    return response


PUBLIC_METHODS = ("/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady",
                  "/inference.GRPCInferenceService/ModelReady")  # health: answered without the API key


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Every method but the health ones needs ``authorization: Bearer <key>`` metadata (what
    ``tritonclient.grpc`` sends with ``headers={"authorization": ...}``); UNAUTHENTICATED otherwise."""

    def __init__(self, api_key: str):
        self.api_key = api_key.encode()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method in PUBLIC_METHODS:
            return handler
        metadata = {k: v for k, v in (details.invocation_metadata or ())}
        scheme, _, token = str(metadata.get("authorization", "")).partition(" ")
        if scheme.lower() == "bearer" and token and hmac.compare_digest(token.strip().encode(), self.api_key):
            return handler
        message = ("authorization: the API key is not valid" if token else
                   "authorization: missing: send the API key as 'authorization: Bearer <key>' metadata")

        async def refuse(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        async def refuse_stream(requests, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # an async generator, as stream handlers are

        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(refuse_stream, handler.request_deserializer,
                                                         handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(refuse, handler.request_deserializer, handler.response_serializer)


class GrpcFrontend:
    """The gRPC server's lifecycle in one worker. A failed bind is logged at ERROR and reported
    through the data plane's readiness (``/readyz`` and ``/v2/health/ready`` answer 503); it does
    not raise, because a raising startup hook makes BentoML respawn the worker in a tight loop."""

    def __init__(self, plane: Any, port: int, host: str = "0.0.0.0", metrics: Any = None, api_key: str = ""):
        self.plane = plane
        self.port, self.host = port, host
        self.metrics = metrics
        self.api_key = api_key
        self.server: grpc.aio.Server | None = None
        self.error: str | None = "not started"
        plane.add_readiness_check("grpc", lambda: self.error)

    async def start(self) -> None:
        server = grpc.aio.server(interceptors=[ApiKeyInterceptor(self.api_key)] if self.api_key else None, options=[
            ("grpc.so_reuseport", 1),  # every worker process serves the port
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ])
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(self.plane, self.metrics), server)
        address = f"{self.host}:{self.port}"
        try:
            if not server.add_insecure_port(address):
                raise RuntimeError(f"could not bind {address}")
            await server.start()
        except Exception as exc:  # noqa: BLE001 - reported through readiness, see the class note
            self.error = f"gRPC server failed to start on {address}: {exc}"
            log.error("%s -- is another program on the port? This worker stays up without gRPC and reports "
                      "not ready.", self.error)
            await server.stop(None)
            return
        self.server, self.error = server, None
        log.info("Open Inference Protocol gRPC server listening on %s", address)

    async def stop(self, grace: float = 5.0) -> None:
        self.error = "stopped"
        if self.server is not None:
            await self.server.stop(grace)
            self.server = None
