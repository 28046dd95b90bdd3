"""The native HTTP API: ``/classify``, ``/segment``, ``/denoise`` (an image upload), ``/sample``,
``/generate``, ``/generate_stream`` (JSON) and ``/models``: wire format only, the work is the data
plane's.

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
from services.textgen import SAMPLING_FIELDS

PNG = b"image/png"
GENERATE_FIELDS = ("prompt", *SAMPLING_FIELDS, "model")
SAMPLE_FIELDS = ("n", "seed", "class_id", "model")


async def image_request(request: Request, fields: tuple[str, ...]) -> tuple[bytes, dict[str, str]]:
    """-> (image bytes, text fields) from a multipart form or a raw image body + query string."""
    media = request.media_type
    body = await request.body()
    if media == "multipart/form-data":
        parts = parse_multipart(body, request.content_type)
        values = {}
        for name, part in parts.items():
            if name == "image":
                continue
            if name not in fields:
                raise bad_request(name, f"unknown form field; this route takes image{''.join(', ' + f for f in fields)}")
            values[name] = part.text()
        if "image" not in parts:
            raise bad_request("image", "missing: send the picture as the multipart file field 'image'")
        return parts["image"].data, values
    if media.startswith("image/") or media == "application/octet-stream":
        unknown = [k for k in request.query if k not in fields]
        if unknown:
            raise bad_request(unknown[0], f"unknown query parameter; this route takes {list(fields)}")
        return body, dict(request.query)
    raise unsupported_media("content-type", f"send multipart/form-data with an 'image' part, or the image itself "
                                            f"with an image/* content type; got {media or 'no content type'}")


def form_int(values: dict[str, str], name: str, default: int | None) -> int | None:
    raw = values.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise bad_request(name, f"must be an integer, got {raw[:50]!r}") from None


def form_float(values: dict[str, str], name: str) -> float | None:
    raw = values.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise bad_request(name, f"must be a number, got {raw[:50]!r}") from None
    if not math.isfinite(value):
        raise bad_request(name, f"must be a finite number, got {raw[:50]!r}")
    return value


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


def image_response(result) -> Response:
    headers = [(b"x-model", result.model.encode())]
    if result.seed is not None:
        headers.append((b"x-seed", str(result.seed).encode()))
    return Response(result.png, 200, PNG, headers)


def optional_str(body: dict, name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise bad_request(name, f"must be a string, got {value!r}")
    return value


def add_native_routes(app: HttpFrontend) -> None:
    async def classify(request: Request) -> Response:
        image, values = await image_request(request, ("top_k", "model"))
        top_k = form_int(values, "top_k", 5)
        return json_response(await app.plane.classify(image, top_k, values.get("model") or None))

    async def segment(request: Request) -> Response:
        image, values = await image_request(request, ("model",))
        return image_response(await app.plane.segment(image, values.get("model") or None))

    async def denoise(request: Request) -> Response:
        image, values = await image_request(request, ("sigma", "model"))
        return image_response(await app.plane.denoise(image, form_float(values, "sigma"), values.get("model") or None))

    async def sample(request: Request) -> Response:
        body = await json_object(request, SAMPLE_FIELDS)
        result = await app.plane.sample(body.get("n", 16), body.get("seed"), body.get("class_id"),
                                        optional_str(body, "model"))
        return image_response(result)

    def prompt_of(body: dict) -> str:
        prompt = body.get("prompt", "")
        if not isinstance(prompt, str):
            raise bad_request("prompt", f"must be a string, got {type(prompt).__name__}")
        return prompt

    async def generate(request: Request) -> Response:
        body = await json_object(request, GENERATE_FIELDS)
        return json_response(await app.plane.generate(prompt_of(body), body, optional_str(body, "model")))

    async def generate_stream(request: Request) -> StreamingResponse:
        body = await json_object(request, GENERATE_FIELDS)
        stream = await app.plane.generate_stream(prompt_of(body), body, optional_str(body, "model"))

        async def events():
            async for chunk in stream.chunks():
                payload: dict[str, Any] = {"text": chunk.text}
                if chunk.finish_reason is not None:
                    payload.update(finish_reason=chunk.finish_reason, seed=stream.seed,
                                   usage={"prompt_tokens": chunk.prompt_tokens,
                                          "completion_tokens": chunk.completion_tokens})
                yield f"data: {json.dumps(payload)}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), b"text/event-stream",
                                 headers=[(b"cache-control", b"no-cache"), (b"x-model", stream.model.encode())])

    async def models(request: Request) -> Response:
        return json_response(app.plane.models())

    async def metrics(request: Request) -> Response:
        from services.metrics import exposition

        page, content_type = exposition()
        return Response(page, content_type=content_type.encode())

    app.route("/classify", classify, model="classify", admits=True, body="image")
    app.route("/segment", segment, model="segment", admits=True, body="image")
    # A large /denoise runs for seconds: it stops when its client leaves.
    app.route("/denoise", denoise, model="denoise", admits=True, body="image", cancel_on_disconnect=True)
    app.route("/sample", sample, model="sample", admits=True)
    app.route("/generate", generate, model="generate", admits=True, cancel_on_disconnect=True)
    app.route("/generate_stream", generate_stream, model="generate", admits=True)
    app.route("/models", models, methods=("GET", "POST"))
    app.route("/metrics", metrics, methods=("GET",), protocol="metrics", public=True, body="none")
