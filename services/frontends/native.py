"""The native HTTP API: every task's routes (``/classify``, ``/segment``, ``/denoise``: an image
upload; ``/sample``, ``/generate``, ``/generate_stream``: JSON; and whatever a new task declares),
read from the task registry, plus ``/models`` and ``/metrics``: wire format only, the work is the
task's, through the data plane.

Image routes take ``multipart/form-data`` (an ``image`` file part plus text fields, what ``curl -F``
sends) or the image itself as the body (``Content-Type: image/png``; fields in the query string).
Image answers carry the model version that produced them in ``X-Model``."""

from __future__ import annotations

import json
import math
from typing import Any

from services.errors import bad_request, unsupported_media
from services.frontends.asgi import HttpFrontend, Request, Response, StreamingResponse, json_response
from services.frontends.multipart import parse_multipart
from services.tasks import task_classes
from services.tasks.base import EventStream, ImageResult, NativeRoute, TaskHandler

PNG = b"image/png"


async def image_request(request: Request, fields: tuple[str, ...]) -> tuple[bytes, dict[str, str]]:
    """-> (image bytes, text fields) from a multipart form or a raw image body; fields may come in
    the query string either way (``curl -F image=@x.jpg '...?model=m'``), a field given both ways
    is refused."""
    media = request.media_type
    unknown = [k for k in request.query if k not in fields]
    if unknown:
        raise bad_request(unknown[0], f"unknown query parameter; this route takes {list(fields)}")
    values = dict(request.query)
    body = await request.body()
    if media == "multipart/form-data":
        parts = parse_multipart(body, request.content_type)
        for name, part in parts.items():
            if name == "image":
                continue
            if name not in fields:
                raise bad_request(name, f"unknown form field; this route takes image{''.join(', ' + f for f in fields)}")
            if name in values:
                raise bad_request(name, "given both as a form field and in the query string")
            values[name] = part.text()
        if "image" not in parts:
            raise bad_request("image", "missing: send the picture as the multipart file field 'image'")
        return parts["image"].data, values
    if media.startswith("image/") or media == "application/octet-stream":
        return body, values
    raise unsupported_media("content-type", f"send multipart/form-data with an 'image' part, or the image itself "
                                            f"with an image/* content type; got {media or 'no content type'}")


def form_value(name: str, raw: str, schema: dict) -> Any:
    """A form or query value (text) as its schema's type; an empty value is left out."""
    kind = schema.get("type", "string")
    if kind == "integer":
        try:
            return int(raw)
        except ValueError:
            raise bad_request(name, f"must be an integer, got {raw[:50]!r}") from None
    if kind == "number":
        try:
            value = float(raw)
        except ValueError:
            raise bad_request(name, f"must be a number, got {raw[:50]!r}") from None
        if not math.isfinite(value):
            raise bad_request(name, f"must be a finite number, got {raw[:50]!r}")
        return value
    if kind == "boolean":
        if raw.lower() not in ("true", "false", "1", "0"):
            raise bad_request(name, f"must be true or false, got {raw[:50]!r}")
        return raw.lower() in ("true", "1")
    return raw


async def json_object(request: Request, fields: tuple[str, ...]) -> dict[str, Any]:
    media = request.media_type
    if media not in ("", "application/json"):
        raise unsupported_media("content-type", f"send application/json, got {media}")
    body = await request.json()
    if not isinstance(body, dict):
        raise bad_request("body", "must be a JSON object")
    unknown = [k for k in body if k not in fields]
    if unknown:
        raise bad_request(unknown[0], f"unknown field; this route takes {list(fields)}")
    return body


def image_response(result: ImageResult) -> Response:
    headers = [(b"x-model", result.model.encode())]
    if result.seed is not None:
        headers.append((b"x-seed", str(result.seed).encode()))
    return Response(result.png, 200, PNG, headers)


def event_response(stream: EventStream) -> StreamingResponse:
    async def events():
        async for payload in stream.events:
            yield f"data: {json.dumps(payload)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), b"text/event-stream",
                             headers=[(b"cache-control", b"no-cache"), (b"x-model", stream.model.encode())])


def answer(result: Any) -> Response | StreamingResponse:
    if isinstance(result, ImageResult):
        return image_response(result)
    if isinstance(result, EventStream):
        return event_response(result)
    return json_response(result)


def task_endpoint(app: HttpFrontend, task: type[TaskHandler], route: NativeRoute):
    schemas = route.fields(None)  # the fields' types (their limits are checked by the task)
    names = (*schemas, "model")

    async def endpoint(request: Request) -> Response | StreamingResponse:
        if route.body == "image":
            image, text = await image_request(request, names)
            values = {k: form_value(k, v.strip(), schemas.get(k, {})) for k, v in text.items() if v.strip()}
        else:
            image, values = None, await json_object(request, names)
        model = values.pop("model", None)
        if model is not None and not isinstance(model, str):
            raise bad_request("model", f"must be a string, got {model!r}")
        if model:
            request.scope["suite.model"] = model.partition(":")[0]
        return answer(await app.plane.run_native(task.name, route, model or None, image, values))

    return endpoint


def add_native_routes(app: HttpFrontend) -> None:
    for task in task_classes().values():
        for route in task.routes:
            # ``model``: the task's default model, for admission before the body is read and metrics
            # (a request naming another model is counted under that one).
            app.route(route.path, task_endpoint(app, task, route), model=task.default_model, admits=True,
                      body=route.body, task=task.name, cancel_on_disconnect=route.cancel_on_disconnect)

    async def models(request: Request) -> Response:
        return json_response(app.plane.models())

    async def metrics(request: Request) -> Response:
        from services.metrics import exposition

        page, content_type = exposition()
        return Response(page, content_type=content_type.encode())

    app.route("/models", models, methods=("GET", "POST"))
    app.route("/metrics", metrics, methods=("GET",), protocol="metrics", public=True, body="none")
