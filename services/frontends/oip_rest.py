"""Open Inference Protocol v2 over HTTP/REST (KServe v2 / Triton) on the native API's port: health,
server and model metadata, model readiness and inference, with JSON tensors and the binary tensor
data extension (a JSON header of ``Inference-Header-Content-Length`` bytes followed by the inputs
that carry a ``binary_data_size`` parameter, in input order; outputs come back binary when asked for:
``binary_data`` per output, ``binary_data_output`` for the request)."""

from __future__ import annotations

import json
from typing import Any

from services.errors import bad_request, unavailable, unsupported_media
from services.frontends.asgi import HttpFrontend, Request, Response, json_response, parse_json
from services.frontends.oip_codec import oip_datatype, tensor_from_list, tensor_from_raw, tensor_to_list, tensor_to_raw

HEADER = "inference-header-content-length"


def parse_body(body: bytes, header_length: str | None) -> tuple[dict, memoryview]:
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise bad_request(HEADER, f"not an integer: {header_length!r}") from None
        if not 0 <= n <= len(body):
            raise bad_request(HEADER, f"{n} is outside the body of {len(body)} bytes")
        head, binary = body[:n], memoryview(body)[n:]
    else:
        head, binary = body, memoryview(b"")
    request = parse_json(head)
    if not isinstance(request, dict):
        raise bad_request("body", "must be a JSON object")
    return request, binary


def declared_inputs(request: dict) -> list[tuple[str, object, object]]:
    """(name, datatype, shape) of every input, as declared, without touching their data."""
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise bad_request("inputs", "must be a non-empty list of tensors")
    declared = []
    for i, tensor in enumerate(inputs):
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise bad_request(f"inputs[{i}]", "each input needs a name, datatype and shape")
        for key in ("datatype", "shape"):
            if key not in tensor:
                raise bad_request(tensor["name"], f"missing {key!r}")
        declared.append((tensor["name"], tensor["datatype"], tensor["shape"]))
    return declared


def decode_inputs(request: dict, binary: memoryview) -> dict:
    """The inputs' data, once ``declared_inputs`` has checked their form (and the data plane their
    names, datatypes and shapes against the contract)."""
    feeds, offset = {}, 0
    for tensor in request["inputs"]:
        name = tensor["name"]
        if name in feeds:
            raise bad_request(name, "input given twice")
        params = tensor.get("parameters") or {}
        if not isinstance(params, dict):
            raise bad_request(name, "parameters must be an object")
        size = params.get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise bad_request(name, f"binary_data_size {size!r} does not fit the {len(binary) - offset} "
                                        f"binary bytes left")
            feeds[name] = tensor_from_raw(name, tensor["datatype"], tensor["shape"], binary[offset: offset + size])
            offset += size
        else:
            if "data" not in tensor:
                raise bad_request(name, "needs 'data' or a binary_data_size parameter")
            feeds[name] = tensor_from_list(name, tensor["datatype"], tensor["shape"], tensor["data"])
    if offset != len(binary):
        raise bad_request("body", f"{len(binary) - offset} binary bytes after the last binary input")
    return feeds


def requested_outputs(request: dict) -> tuple[list[str] | None, dict[str, bool], bool]:
    """-> (names or None for all, binary flag per named output, request-level binary default)."""
    params = request.get("parameters") or {}
    if not isinstance(params, dict):
        raise bad_request("parameters", "must be an object")
    default_binary = bool(params.get("binary_data_output", False))
    outputs = request.get("outputs")
    if outputs is None:
        return None, {}, default_binary
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs):
        raise bad_request("outputs", "must be a list of objects with a name")
    for o in outputs:
        if not isinstance(o.get("parameters") or {}, dict):
            raise bad_request(o["name"], "output parameters must be an object")
    binary = {o["name"]: bool((o.get("parameters") or {}).get("binary_data", default_binary)) for o in outputs}
    return [o["name"] for o in outputs], binary, default_binary


def encode_response(request: dict, result, binary_flags: dict[str, bool], default_binary: bool) -> Response:
    blobs: list[bytes] = []
    tensors: list[dict[str, Any]] = []
    for out_name, array in result.outputs.items():
        tensor: dict[str, Any] = {"name": out_name, "datatype": oip_datatype(array.dtype), "shape": list(array.shape)}
        if binary_flags.get(out_name, default_binary):
            raw = tensor_to_raw(array)
            tensor["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            tensor["data"] = tensor_to_list(array)
        tensors.append(tensor)
    response: dict[str, Any] = {"model_name": result.model, "model_version": result.version, "outputs": tensors}
    if "id" in request:
        response["id"] = request["id"]
    if result.parameters:
        response["parameters"] = result.parameters
    head = json.dumps(response, separators=(",", ":")).encode()
    if not blobs:
        return Response(head)
    return Response(b"".join([head, *blobs]), content_type=b"application/octet-stream",
                    headers=[(HEADER.encode(), str(len(head)).encode())])


def add_oip_rest_routes(app: HttpFrontend) -> None:
    def version(request: Request) -> str | None:
        return request.path_params.get("version") or None

    async def server_metadata(request: Request) -> Response:
        return json_response(app.plane.server_metadata())

    async def live(request: Request) -> Response:
        return json_response({"live": True})

    async def ready(request: Request) -> Response:
        app.plane.require_ready()
        return json_response({"ready": True})

    async def model_metadata(request: Request) -> Response:
        return json_response(app.plane.model_metadata(request.path_params["model"], version(request)))

    async def model_ready(request: Request) -> Response:
        name = request.path_params["model"]
        if not app.plane.model_ready(name, version(request)):
            if version(request):
                raise unavailable("model", f"model {name!r} version {version(request)!r} is not loaded; it loads "
                                           f"on its first request")
            raise app.plane.admission_error(name) or unavailable("model", f"model {name!r} is not ready")
        return json_response({"name": name, "ready": True})

    async def repository_index(request: Request) -> Response:
        body = await control_body(request)
        ready = body.get("ready", False)
        if not isinstance(ready, bool):
            raise bad_request("ready", f"must be true or false, got {ready!r}")
        return json_response(app.plane.repository_index(ready_only=ready))

    async def load(request: Request) -> Response:
        parameters = (await control_body(request)).get("parameters") or {}
        if not isinstance(parameters, dict) or any(k != "version" for k in parameters):
            raise bad_request("parameters", "the only load parameter is version (a stored version to pin)")
        pinned = parameters.get("version")
        if pinned is not None and not isinstance(pinned, str):
            raise bad_request("version", f"must be a string, got {pinned!r}")
        return json_response(await app.plane.load_model(request.path_params["model"], pinned))

    async def unload(request: Request) -> Response:
        await control_body(request)
        return json_response(await app.plane.unload_model(request.path_params["model"]))

    async def rollout(request: Request) -> Response:
        model = request.path_params["model"]
        if request.method == "GET":
            return json_response(app.plane.rollout_status(model))
        body = await control_body(request)
        if "model" in body and body["model"] != model:
            raise bad_request("model", f"the path names {model!r}")
        return json_response(app.plane.start_rollout({**body, "model": model}))

    async def promote(request: Request) -> Response:
        body = await control_body(request)
        force = body.get("force", False)
        if not isinstance(force, bool) or set(body) - {"force"}:
            raise bad_request("force", "the only field is force (true: promote whatever was measured)")
        return json_response(await app.plane.promote(request.path_params["model"], force))

    async def stop_rollout(request: Request) -> Response:
        await control_body(request)
        return json_response(app.plane.stop_rollout(request.path_params["model"]))

    async def infer(request: Request) -> Response:
        body = await request.body()
        payload, binary = parse_body(body, request.headers.get(HEADER))
        # Names, datatypes and declared shapes against the contract before any tensor is decoded.
        app.plane.check_declared(request.path_params["model"], version(request), declared_inputs(payload))
        feeds = decode_inputs(payload, binary)
        names, binary_flags, default_binary = requested_outputs(payload)
        params = payload.get("parameters") or {}
        result = await app.plane.infer(request.path_params["model"], version(request), feeds, params, names)
        return encode_response(payload, result, binary_flags, default_binary)

    model, versioned = "/v2/models/{model}", "/v2/models/{model}/versions/{version}"
    get = ("GET",)
    app.route("/v2", server_metadata, get, "oip_rest")
    app.route("/v2/", server_metadata, get, "oip_rest")
    app.route("/v2/health/live", live, get, "oip_rest", public=True)
    app.route("/v2/health/ready", ready, get, "oip_rest", public=True)
    app.route("/v2/repository/index", repository_index, ("POST",), "oip_rest")
    app.route("/v2/repository/models/{model}/load", load, ("POST",), "oip_rest", ":model", control=True)
    app.route("/v2/repository/models/{model}/unload", unload, ("POST",), "oip_rest", ":model", control=True)
    rollouts = "/v2/repository/models/{model}/rollout"
    app.route(rollouts, rollout, ("GET", "POST"), "oip_rest", ":model", control=True)
    app.route(rollouts + "/promote", promote, ("POST",), "oip_rest", ":model", control=True)
    app.route(rollouts + "/stop", stop_rollout, ("POST",), "oip_rest", ":model", control=True)
    for prefix in (model, versioned):
        app.route(prefix, model_metadata, get, "oip_rest", ":model", body="none")
        app.route(prefix + "/ready", model_ready, get, "oip_rest", ":model", body="none")
        app.route(prefix + "/infer", infer, ("POST",), "oip_rest", ":model", admits=True, body="tensors",
                  cancel_on_disconnect=lambda plane, model: plane.runs_long(model))


async def control_body(request: Request) -> dict:
    """A repository request's optional JSON object body."""
    if request.media_type not in ("", "application/json"):
        raise unsupported_media("content-type", f"send application/json, got {request.media_type}")
    body = await request.json()
    if not isinstance(body, dict):
        raise bad_request("body", "must be a JSON object")
    return body
