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
import contextlib
import functools
import hmac
import logging
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from services.budget import TRIM_AFTER_BYTES, give_back_memory_soon
from services.errors import ServingError, bad_request
from services import tracing
from services.rollout import ROLLOUT_HEADER, requested_arm
from services.frontends.oip_codec import numpy_dtype, oip_datatype, tensor_from_list, tensor_from_raw, tensor_to_raw

if TYPE_CHECKING:  # the data plane sits below the front-ends; imported for types only
    from services.config import ServingConfig
    from services.dataplane import DataPlane
    from services.metrics import ServingMetrics

log = logging.getLogger("services.frontends.grpc")
MAX_MESSAGE = 64 * 1024 * 1024  # the ceiling; the server's own limit comes from its models' contracts
STREAM_IN_FLIGHT = 16  # requests of one ModelStreamInfer call served at once; the reader waits past it
STREAM_BUFFER = 64  # responses of one stream waiting for the client to read them; producers wait past it
FINAL, EMPTY_FINAL = "triton_final_response", "triton_enable_empty_final_response"  # Triton's decoupled-model parameters
CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
         403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND, 408: grpc.StatusCode.DEADLINE_EXCEEDED,
         413: grpc.StatusCode.INVALID_ARGUMENT, 415: grpc.StatusCode.INVALID_ARGUMENT, 500: grpc.StatusCode.INTERNAL, 501: grpc.StatusCode.UNIMPLEMENTED,
         503: grpc.StatusCode.UNAVAILABLE}


def grpc_status(exc: ServingError) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and details a refusal is answered with."""
    return CODES.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT), str(exc)


# Typed ``InferTensorContents`` field per datatype (FP16 has none: raw only).
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
            "FP64": "fp64_contents", "BYTES": "bytes_contents"}


@functools.cache
def header_message() -> type:
    """``ModelInferRequest`` without its inputs' typed ``contents``: parsing a request with it skips
    the contents as one unknown field (a single bytes blob), so a message of 30 M tiny elements is
    checked against the model's contract without building 30 M Python objects (measured before:
    +2 GB RSS and 8 s of decoding for such a message). Built once from the protocol's own
    descriptor, in a pool of its own, so nothing is restated by hand."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    source = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(source)
    light = descriptor_pb2.FileDescriptorProto(name="suite_infer_header.proto", package="suite_infer_header",
                                               syntax=source.syntax)
    keep = {"ModelInferRequest", "InferParameter"}
    for message in source.message_type:
        if message.name in keep:
            light.message_type.add().CopyFrom(message)

    def rename(message) -> None:
        if message.name == "InferInputTensor":
            fields = [f for f in message.field if f.name != "contents"]
            del message.field[:]
            message.field.extend(fields)
        for field in message.field:
            if field.type_name:  # only where set: assigning "" would mark a scalar field as typed
                field.type_name = field.type_name.replace(".inference.", ".suite_infer_header.")
        for nested in message.nested_type:
            rename(nested)

    for message in light.message_type:
        rename(message)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(light)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("suite_infer_header.ModelInferRequest"))


def parameter_value(p: pb.InferParameter) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


def parse_checked(plane: DataPlane, raw: bytes) -> pb.ModelInferRequest:
    """A raw ModelInferRequest: its header (model, declared tensors) is parsed and checked against
    the contract first; the whole message only once that passes."""
    try:
        head = header_message().FromString(raw)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError; the client sent it
        raise bad_request("request", "not a valid ModelInferRequest message") from None
    refusal = plane.admission_error(head.model_name)
    if refusal is not None:
        raise refusal
    check_declared(plane, head)
    try:
        return pb.ModelInferRequest.FromString(raw)
    except Exception:  # noqa: BLE001
        raise bad_request("request", "not a valid ModelInferRequest message") from None


def check_declared(plane: DataPlane, request: pb.ModelInferRequest) -> None:
    """Names, datatypes and shapes against the model's contract before any contents are decoded."""
    if not request.inputs:
        raise bad_request("inputs", "must be a non-empty list of tensors")
    plane.check_declared(request.model_name, request.model_version or None,
                         [(t.name, t.datatype, list(t.shape)) for t in request.inputs])


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
    def __init__(self, plane: DataPlane, metrics: ServingMetrics | None = None):
        self.plane = plane
        self.metrics = metrics

    async def _fail(self, context: grpc.aio.ServicerContext, exc: ServingError):
        await context.abort(*grpc_status(exc))

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

    async def ModelInfer(self, raw, context):
        size, status, model, refusal, response = len(raw), 200, "", None, None
        if self.plane.rollouts.plans:  # a request may pin itself to a rollout's arm (metadata as the HTTP header)
            requested_arm.set(dict(context.invocation_metadata() or ()).get(ROLLOUT_HEADER))
        # One frame for the whole call (no wrapper holding ``raw`` while this one aborts: see below).
        span = tracing.request_span("ModelInfer", dict(context.invocation_metadata() or ()), {
            "rpc.system": "grpc", "rpc.method": "ModelInfer", "protocol": "oip_grpc"}) if tracing._tracer else NO_SPAN
        with span:
            try:
                request = parse_checked(self.plane, raw)  # the model, then the declared tensors, then the rest
                model = request.model_name
                feeds = decode_inputs(request)
                params = {k: parameter_value(v) for k, v in request.parameters.items()}
                requested = [o.name for o in request.outputs] or None
                result = await self.plane.infer(request.model_name, request.model_version or None, feeds, params,
                                                requested)
                response = infer_response(request, result)
            except ServingError as exc:
                status = exc.status
                refusal = grpc_status(exc)
            except Exception:
                status = 500
                log.exception("Open Inference Protocol gRPC ModelInfer failed")
                refusal = (grpc.StatusCode.INTERNAL, "internal error; the server log has the details")
            # Aborting raises, and gRPC keeps that exception (and through its traceback this frame) until
            # the garbage collector runs: measured holding a refused 60 MB message's two copies for more
            # than 10 s. So the payload is dropped first, and the abort is raised outside the except.
            raw = request = feeds = None  # noqa: F841
            if self.metrics is not None:
                self.metrics.request(model, "oip_grpc", status)
            if size >= TRIM_AFTER_BYTES:  # gRPC's receive buffers of a large message: back to the kernel
                give_back_memory_soon()
            if refusal is not None:
                await context.abort(*refusal)
            return response

    async def ModelStreamInfer(self, request_iterator, context):
        """Decoupled inference (Triton's convention): every request on the stream is served
        concurrently; a text model answers with one response per chunk of text, others with one.
        Each response carries ``triton_final_response``; a request with
        ``triton_enable_empty_final_response`` gets its data responses marked not final and then an
        empty final one. A failed request answers ``error_message`` and the stream goes on. When the
        client cancels the stream, its generations stop."""
        # Bounded both ways: at most STREAM_IN_FLIGHT requests of this call are served at once (the
        # reader stops reading past it), and at most STREAM_BUFFER responses wait for a slow client
        # (producers wait past it), so one stream cannot hold unbounded work or memory.
        queue: asyncio.Queue = asyncio.Queue(STREAM_BUFFER)
        serving: set[asyncio.Task] = set()
        slots = asyncio.Semaphore(STREAM_IN_FLIGHT)
        read_all = object()

        async def serve(raw: bytes) -> None:
            status, request = 200, pb.ModelInferRequest()
            try:
                request = parse_checked(self.plane, raw)
                feeds = decode_inputs(request)
                params = {k: parameter_value(v) for k, v in request.parameters.items()}
                empty_final = bool(params.pop(EMPTY_FINAL, False))
                results = await self.plane.infer_stream(request.model_name, request.model_version or None, feeds, params)
                async for result in results:
                    response = infer_response(request, result)
                    set_parameter(response.parameters[FINAL], result.final and not empty_final)
                    await queue.put(pb.ModelStreamInferResponse(infer_response=response))
                if empty_final:
                    response = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
                    set_parameter(response.parameters[FINAL], True)
                    await queue.put(pb.ModelStreamInferResponse(infer_response=response))
            except ServingError as exc:
                status = exc.status
                await queue.put(pb.ModelStreamInferResponse(error_message=str(exc)))
            except Exception:
                status = 500
                log.exception("Open Inference Protocol gRPC ModelStreamInfer failed")
                await queue.put(pb.ModelStreamInferResponse(error_message="internal error; the server log has the details"))
            finally:
                slots.release()
                if self.metrics is not None:
                    self.metrics.request(request.model_name, "oip_grpc_stream", status)

        async def read() -> None:
            async for request in request_iterator:
                await slots.acquire()
                task = asyncio.ensure_future(serve(request))
                serving.add(task)
                task.add_done_callback(lambda t: (serving.discard(t), queue.put_nowait(None) if not queue.full()
                                                  else None))
            await queue.put(read_all)

        reader = asyncio.ensure_future(read())
        try:
            reading = True
            while reading or serving or not queue.empty():
                try:  # a finished request's wake-up (None) is dropped while the buffer is full: look again soon
                    item = await asyncio.wait_for(queue.get(), 1.0)
                except asyncio.TimeoutError:
                    continue
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


NO_SPAN = contextlib.nullcontext()
PUBLIC_METHODS = ("/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady",
                  "/inference.GRPCInferenceService/ModelReady", "/grpc.health.v1.Health/Check",
                  "/grpc.health.v1.Health/Watch")  # health: answered without the API key
CONTROL_METHODS = ("/inference.GRPCInferenceService/RepositoryModelLoad",
                   "/inference.GRPCInferenceService/RepositoryModelUnload")  # model control: the admin key


def _bearer(details) -> str:
    metadata = {k: v for k, v in (details.invocation_metadata or ())}
    scheme, _, token = str(metadata.get("authorization", "")).partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Every method but the health ones needs ``authorization: Bearer <api_key>`` metadata when an
    API key is set (what ``tritonclient.grpc`` sends with ``headers={"authorization": ...}``);
    model control is PERMISSION_DENIED unless enabled, then needs the admin key. A refused call's
    message is never parsed: its handler takes the raw bytes, so a large hostile message costs no
    decoding."""

    def __init__(self, api_key: str, model_control: str, admin_key: str):
        self.api_key = api_key.encode()
        self.model_control = model_control
        self.admin_key = admin_key.encode()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method in PUBLIC_METHODS:
            return handler
        token = _bearer(details).encode()
        if details.method in CONTROL_METHODS:
            if self.model_control != "explicit":
                return _refusal(handler, grpc.StatusCode.PERMISSION_DENIED,
                                "model_control: model control is off on this server (model_control=none)")
            if token and hmac.compare_digest(token, self.admin_key):
                return handler
            return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED,
                            "authorization: model control needs the admin key as 'authorization: Bearer <key>'")
        if not self.api_key or (token and hmac.compare_digest(token, self.api_key)):
            return handler
        return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED,
                        "authorization: the API key is not valid" if token else
                        "authorization: missing: send the API key as 'authorization: Bearer <key>' metadata")


def _refusal(handler, code: grpc.StatusCode, message: str):
    async def refuse(request, context):
        await context.abort(code, message)

    async def refuse_stream(requests, context):
        await context.abort(code, message)
        yield  # an async generator, as stream handlers are

    # No request deserializer: the refused message stays bytes.
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_stream, None, handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(refuse, None, handler.response_serializer)


def add_servicer(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """The generated registration, but ModelInfer and ModelStreamInfer receive their messages as
    bytes (``parse_checked`` parses them in two steps)."""
    registered = {}

    class Capture:  # takes what the generated function registers
        def add_generic_rpc_handlers(self, handlers):
            pass

        def add_registered_method_handlers(self, service, handlers):
            registered.update({f"/{service}/{name}": h for name, h in handlers.items()})

    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, Capture())
    handlers = {}
    for path, handler in registered.items():
        name = path.rsplit("/", 1)[-1]
        if name == "ModelInfer":
            handler = grpc.unary_unary_rpc_method_handler(servicer.ModelInfer, None, handler.response_serializer)
        elif name == "ModelStreamInfer":
            handler = grpc.stream_stream_rpc_method_handler(servicer.ModelStreamInfer, None,
                                                            handler.response_serializer)
        handlers[name] = handler
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("inference.GRPCInferenceService",
                                                                          handlers),))
    server.add_registered_method_handlers("inference.GRPCInferenceService", handlers)


HEALTH_SERVICES = ("", "inference.GRPCInferenceService")  # the whole server, and the inference service
HEALTH_WATCH_INTERVAL_S = 1.0


class HealthServicer(health_pb2_grpc.HealthServicer):
    """The standard gRPC health protocol (``grpc.health.v1``: what Kubernetes' gRPC probes,
    grpc-health-probe and load balancers call): SERVING once the data plane is ready (its models
    loaded, gRPC up), NOT_SERVING while it is not, SERVICE_UNKNOWN for any other service name.
    Answered from the data plane's readiness at each call, so it never disagrees with ``/readyz``."""

    def __init__(self, plane: DataPlane):
        self.plane = plane

    def _status(self, service: str) -> int:
        statuses = health_pb2.HealthCheckResponse
        if service not in HEALTH_SERVICES:
            return statuses.SERVICE_UNKNOWN
        return statuses.SERVING if self.plane.ready() else statuses.NOT_SERVING

    async def Check(self, request, context):
        status = self._status(request.service)
        if status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN:  # the protocol's answer: NOT_FOUND
            await context.abort(grpc.StatusCode.NOT_FOUND, f"service {request.service!r} is not served here")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request, context):
        """The status now, then each change (checked every second) until the client leaves."""
        last = None
        while True:
            status = self._status(request.service)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(HEALTH_WATCH_INTERVAL_S)


class GrpcFrontend:
    """The gRPC server's lifecycle in one worker. A failed bind is logged at ERROR and reported
    through the data plane's readiness (``/readyz`` and ``/v2/health/ready`` answer 503); it does
    not raise, because a raising startup hook makes BentoML respawn the worker in a tight loop."""

    def __init__(self, plane: DataPlane, config: ServingConfig, metrics: ServingMetrics | None = None):
        self.plane = plane
        self.config = config
        self.port, self.host = config.grpc_port, config.grpc_bind_host
        self.metrics = metrics
        self.server: grpc.aio.Server | None = None
        self.error: str | None = "not started"
        plane.add_readiness_check("grpc", lambda: self.error)

    async def start(self) -> None:
        config = self.config
        interceptor = AccessInterceptor(config.api_key, config.model_control, config.admin_key)
        receive = min(config.max_body_bytes, self.plane.grpc_message_limit())
        server = grpc.aio.server(interceptors=[interceptor], options=[
            ("grpc.so_reuseport", 1),  # every worker process serves the port
            # The largest message one of this server's models can need (its contract's largest
            # tensors), so a hostile one is refused by gRPC's own parser before it is decoded.
            ("grpc.max_receive_message_length", receive),
            ("grpc.max_send_message_length", MAX_MESSAGE),
            # A connection that has not finished its handshake in time is closed (default 120 s).
            ("grpc.server_handshake_timeout_ms", int(config.header_timeout_s * 1000)),
            ("grpc.max_connection_idle_ms", 300_000),
            ("grpc.max_concurrent_streams", 128),
        ])
        add_servicer(InferenceServicer(self.plane, self.metrics), server)
        health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(self.plane), server)
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
        log.info("Open Inference Protocol gRPC server listening on %s (messages up to %d bytes)", address, receive)

    async def stop(self, grace: float = 5.0) -> None:
        self.error = "stopped"
        if self.server is not None:
            await self.server.stop(grace)
            self.server = None
