"""Open Inference Protocol v2 over HTTP/REST: a Starlette app that ``Suite`` mounts at ``/v2``
(``bentoml.asgi_app(app, path="/v2")``), so it shares the BentoML port, worker and sessions.

JSON tensors and the binary tensor data extension: a request body may be a JSON header of
``Inference-Header-Content-Length`` bytes followed by the inputs that carry a ``binary_data_size``
parameter, in input order; outputs come back binary when asked for (``binary_data`` per output,
``binary_data_output`` for the request). BYTES elements are 4-byte little-endian length-prefixed."""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.errors import NotReadyError, RequestError
from services.oip.core import OipCore, oip_datatype, tensor_from_list, tensor_from_raw, tensor_to_list, tensor_to_raw

HEADER = "Inference-Header-Content-Length"
log = logging.getLogger("services.oip.rest")


def core() -> OipCore:
    """The ``OipCore`` of the running ``Suite`` (set by its startup hook)."""
    import bentoml

    try:
        suite = bentoml.get_current_service()
    except Exception:  # no instance yet (startup) or already gone (shutdown)
        raise NotReadyError("server", "service is starting or stopping") from None
    oip = getattr(suite, "oip", None)
    if oip is None:
        raise NotReadyError("server", "Open Inference Protocol front-end not started")
    return oip


def error(exc: RequestError) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=exc.status)


def handles_errors(fn):
    async def endpoint(request: Request) -> Response:
        try:
            return await fn(request)
        except RequestError as exc:
            return error(exc)
        except Exception as exc:  # a JSON body clients can parse, not Starlette's plain-text 500
            log.exception("Open Inference Protocol REST %s failed", request.url.path)
            return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)
    endpoint.__name__ = fn.__name__
    return endpoint


def _version(request: Request) -> str | None:
    return request.path_params.get("version") or None


@handles_errors
async def server_metadata(request: Request) -> Response:
    return JSONResponse(core().server_metadata())


@handles_errors
async def live(request: Request) -> Response:
    core()
    return JSONResponse({"live": True})


@handles_errors
async def ready(request: Request) -> Response:
    core().require_ready()
    return JSONResponse({"ready": True})


@handles_errors
async def model_metadata(request: Request) -> Response:
    return JSONResponse(core().model_metadata(request.path_params["model"], _version(request)))


@handles_errors
async def model_ready(request: Request) -> Response:
    oip = core()
    name, version = request.path_params["model"], _version(request)
    if not oip.model_ready(name, version):
        raise NotReadyError("model", f"model {name!r} is not ready")
    return JSONResponse({"name": name, "ready": True})


def parse_request(body: bytes, header_length: str | None) -> tuple[dict, memoryview]:
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise RequestError(HEADER, f"not an integer: {header_length!r}") from None
        if not 0 <= n <= len(body):
            raise RequestError(HEADER, f"{n} is outside the body of {len(body)} bytes")
        head, binary = body[:n], memoryview(body)[n:]
    else:
        head, binary = body, memoryview(b"")
    try:
        request = json.loads(head)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError("body", f"not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise RequestError("body", "must be a JSON object")
    return request, binary


def decode_inputs(request: dict, binary: memoryview) -> dict:
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError("inputs", "must be a non-empty list of tensors")
    feeds, offset = {}, 0
    for i, tensor in enumerate(inputs):
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise RequestError(f"inputs[{i}]", "each input needs a name, datatype and shape")
        name = tensor["name"]
        if name in feeds:
            raise RequestError(name, "input given twice")
        for key in ("datatype", "shape"):
            if key not in tensor:
                raise RequestError(name, f"missing {key!r}")
        params = tensor.get("parameters") or {}
        if not isinstance(params, dict):
            raise RequestError(name, "parameters must be an object")
        size = params.get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise RequestError(name, f"binary_data_size {size!r} does not fit the {len(binary) - offset} "
                                         f"binary bytes left")
            feeds[name] = tensor_from_raw(name, tensor["datatype"], tensor["shape"], binary[offset: offset + size])
            offset += size
        else:
            if "data" not in tensor:
                raise RequestError(name, "needs 'data' or a binary_data_size parameter")
            feeds[name] = tensor_from_list(name, tensor["datatype"], tensor["shape"], tensor["data"])
    if offset != len(binary):
        raise RequestError("body", f"{len(binary) - offset} binary bytes after the last binary input")
    return feeds


def requested_outputs(request: dict) -> tuple[list[str] | None, dict[str, bool], bool]:
    """-> (names or None for all, binary flag per named output, request-level binary default)."""
    params = request.get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError("parameters", "must be an object")
    default_binary = bool(params.get("binary_data_output", False))
    outputs = request.get("outputs")
    if outputs is None:
        return None, {}, default_binary
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs):
        raise RequestError("outputs", "must be a list of objects with a name")
    binary = {o["name"]: bool((o.get("parameters") or {}).get("binary_data", default_binary)) for o in outputs}
    return [o["name"] for o in outputs], binary, default_binary


@handles_errors
async def infer(request: Request) -> Response:
    oip = core()
    body = await request.body()
    payload, binary = parse_request(body, request.headers.get(HEADER))
    feeds = decode_inputs(payload, binary)
    names, binary_flags, default_binary = requested_outputs(payload)
    params = payload.get("parameters") or {}
    name = request.path_params["model"]
    version, outputs, out_params = await oip.infer(name, _version(request), feeds, params, names)

    blobs: list[bytes] = []
    tensors: list[dict[str, Any]] = []
    for out_name, array in outputs.items():
        tensor: dict[str, Any] = {"name": out_name, "datatype": oip_datatype(array.dtype), "shape": list(array.shape)}
        if binary_flags.get(out_name, default_binary):
            raw = tensor_to_raw(array)
            tensor["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            tensor["data"] = tensor_to_list(array)
        tensors.append(tensor)
    response: dict[str, Any] = {"model_name": name, "model_version": version, "outputs": tensors}
    if "id" in payload:
        response["id"] = payload["id"]
    if out_params:
        response["parameters"] = out_params
    head = json.dumps(response, separators=(",", ":")).encode()
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(b"".join([head, *blobs]), media_type="application/octet-stream",
                    headers={HEADER: str(len(head))})


def create_app() -> Starlette:
    """Routes relative to the ``/v2`` mount point."""
    model = "/models/{model}"
    versioned = "/models/{model}/versions/{version}"
    return Starlette(routes=[
        Route("/", server_metadata, methods=["GET"]),
        Route("/health/live", live, methods=["GET"]),
        Route("/health/ready", ready, methods=["GET"]),
        Route(model, model_metadata, methods=["GET"]),
        Route(versioned, model_metadata, methods=["GET"]),
        Route(model + "/ready", model_ready, methods=["GET"]),
        Route(versioned + "/ready", model_ready, methods=["GET"]),
        Route(model + "/infer", infer, methods=["POST"]),
        Route(versioned + "/infer", infer, methods=["POST"]),
    ])


app = create_app()
# ``GET /v2`` itself: a mount at /v2 only sees /v2/..., and the outer router would answer /v2 with a
# 307 to /v2/, which tritonclient does not follow. Mounted at "/", it matches nothing else.
root_app = Starlette(routes=[Route("/v2", server_metadata, methods=["GET"])])
