"""The OpenAPI 3 document of the HTTP front-ends, served at ``/docs.json`` (BentoML's Swagger UI at
``/`` renders it). Limits come from the served models' contracts, so the document states what
the running server enforces."""

from __future__ import annotations

from typing import Any

ERROR = {"$ref": "#/components/schemas/Error"}


def _errors(*codes: int) -> dict:
    reasons = {400: "bad input; `field` names it", 404: "unknown model or version", 405: "method not allowed",
               413: "body or image over its limit", 415: "unsupported content type",
               503: "not ready or overloaded; retry after `Retry-After` seconds"}
    return {str(c): {"description": reasons[c], "content": {"application/json": {"schema": ERROR}}} for c in codes}


def _png(description: str) -> dict:
    return {"200": {"description": description, "headers": {"X-Model": {"schema": {"type": "string"},
                                                                          "description": "name:version that ran"}},
                    "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}}


def _model_field(plane: Any, family: str) -> dict:
    """The optional ``model`` field of a task route, naming the served models of that task."""
    names = []
    for name in plane.repository.names:
        if plane.repository.versions(name) and plane.repository.contract(name).family == family:
            names.append(name)
    return {"type": "string", "description": f"served model to use, as name or name:version (default: {family}); "
                                             f"served now: {', '.join(names) or 'none'}"}


def _image_route(summary: str, fields: dict, responses: dict) -> dict:
    form = {"type": "object", "required": ["image"],
            "properties": {"image": {"type": "string", "format": "binary", "description": "PNG or JPEG"}, **fields}}
    params = [{"name": k, "in": "query", "required": False, "schema": v} for k, v in fields.items()]
    raw = {"schema": {"type": "string", "format": "binary"}}
    return {"post": {"summary": summary, "parameters": params,
                     "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form},
                                                                   "image/png": raw, "image/jpeg": raw}},
                     "responses": {**responses, **_errors(400, 413, 415, 503)}}}


def _json_route(summary: str, schema: dict, responses: dict) -> dict:
    return {"post": {"summary": summary, "requestBody": {"required": False, "content": {"application/json": {"schema": schema}}},
                     "responses": {**responses, **_errors(400, 413, 415, 503)}}}


def openapi_document(plane: Any) -> dict:
    contract = plane.repository.contract
    classify, denoise, sample, generate = (contract(n) if n in plane.repository.names else None
                                           for n in ("classify", "denoise", "sample", "generate"))
    paths: dict[str, Any] = {}
    if classify:
        paths["/classify"] = _image_route(
            "Classify an image (any size, grayscale or RGB)",
            {"top_k": {"type": "integer", "minimum": 1, "maximum": 100, "default": 5},
             "model": _model_field(plane, "classify")},
            {"200": {"description": "top-k predictions", "content": {"application/json": {"schema": {
                "type": "object", "properties": {"model": {"type": "string"}, "predictions": {"type": "array", "items": {
                    "type": "object", "properties": {"label": {"type": "string"}, "class_id": {"type": "integer"},
                                                     "probability": {"type": "number"}}}},
                    "ood_score": {"type": "number", "minimum": 0, "maximum": 1, "description":
                                  "how unlike the training digits the input is: where its reconstruction error falls "
                                  "among the held-out digits' errors (about 0.5 for a digit, 1.0 above them all; "
                                  "models exported with the digit autoencoder)"},
                    "reconstruction_error": {"type": "number", "description": "the autoencoder's mean squared "
                                             "error on the normalised input"}}}}}}})
    if "segment" in plane.repository.names:
        paths["/segment"] = _image_route("Label mask of an image, same width and height",
                                         {"model": _model_field(plane, "segment")},
                                         _png("PNG mask; pixel value = class id"))
    if denoise:
        paths["/denoise"] = _image_route(
            "Denoise an image", {"sigma": {"type": "number", "minimum": 0, "maximum": denoise.limits["max_sigma"],
                                           "description": "noise level on the 0-255 scale; omitted = blind"},
                        "model": _model_field(plane, "denoise")},
            _png("denoised PNG, same size and mode"))
    if sample:
        paths["/sample"] = _json_route("A grid of GAN samples", {"type": "object", "additionalProperties": False, "properties": {
            "n": {"type": "integer", "minimum": 1, "maximum": sample.limits["max_n"], "default": 16},
            "seed": {"type": "integer", "minimum": 0, "maximum": 2 ** 63 - 1},
            "class_id": {"type": "integer", "minimum": 0, "maximum": len(sample.labels) - 1},
            "model": _model_field(plane, "sample")}}, _png("PNG grid, 8 samples per row; X-Seed holds the seed"))
    if generate:
        body = {"type": "object", "additionalProperties": False, "properties": {
            "prompt": {"type": "string", "maxLength": generate.limits["max_prompt_chars"], "default": ""},
            "max_new_tokens": {"type": "integer", "minimum": 1, "maximum": generate.limits["max_new_tokens"], "default": 64},
            "temperature": {"type": "number", "minimum": 0, "maximum": 10, "default": 1.0},
            "top_k": {"type": "integer", "minimum": 0, "default": 0},
            "top_p": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 1, "default": 1.0},
            "seed": {"type": "integer", "minimum": 0, "maximum": 2 ** 63 - 1},
            "stop": {"type": "array", "maxItems": 8, "items": {"type": "string", "minLength": 1, "maxLength": 100}},
            **PENALTIES, "model": _model_field(plane, "generate")}}
        paths["/generate"] = _json_route("Complete a prompt; the same seed gives the same text", body, {"200": {
            "description": "the completion", "content": {"application/json": {"schema": {"type": "object", "properties": {
                "text": {"type": "string"}, "finish_reason": {"type": "string", "enum": ["length", "stop"]},
                "usage": {"type": "object"}, "seed": {"type": "integer"}, "model": {"type": "string"}}}}}}})
        paths["/generate_stream"] = _json_route("Same as /generate, as server-sent events", body, {"200": {
            "description": "`data: {\"text\": ...}` events, a last one with finish_reason and usage, then `data: [DONE]`",
            "content": {"text/event-stream": {"schema": {"type": "string"}}}}})
        paths.update(_openai_paths(generate))
    models = {"200": {"description": "served models: version, contract, metrics, parity",
                      "content": {"application/json": {"schema": {"type": "array", "items": {"type": "object"}}}}}}
    paths["/models"] = {"get": {"summary": "Served models", "responses": models},
                        "post": {"summary": "Served models (POST kept for older clients)", "responses": models}}
    paths.update(_oip_paths())
    for path, summary in (("/livez", "Liveness (BentoML)"), ("/readyz", "Readiness: models loaded and gRPC up (BentoML)"),
                          ("/metrics", "Prometheus metrics (BentoML's and the suite's per-model ones)")):
        paths[path] = {"get": {"summary": summary, "responses": {"200": {"description": "OK"}}}}
    return {"openapi": "3.0.2",
            "info": {"title": "model-suite", "version": plane.server_version,
                     "description": "Native task API, Open Inference Protocol v2 REST (gRPC on its own port), "
                                    "OpenAI-compatible completions."},
            "paths": paths,
            "components": {"schemas": {"Error": {"type": "object", "required": ["error"], "properties": {
                "error": {"type": "string"}, "field": {"type": "string"}}}}}}


PENALTIES = {
    "repetition_penalty": {"type": "number", "minimum": 0.01, "maximum": 10, "default": 1.0},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2, "default": 0},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2, "default": 0},
    "ignore_eos": {"type": "boolean", "default": False}}


def _openai_paths(generate) -> dict:
    from services.frontends.openai import DEFAULT_MAX_TOKENS, MAX_CHOICES, MAX_PROMPTS

    openai_error = {"type": "object", "properties": {"error": {"type": "object", "properties": {
        "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": "string", "nullable": True},
        "code": {"type": "string", "nullable": True}}}}}
    errors = {str(c): {"description": d, "content": {"application/json": {"schema": openai_error}}}
              for c, d in ((400, "bad request (OpenAI error object)"), (404, "unknown model"),
                           (503, "busy: retry after Retry-After seconds"))}
    prompt = {"type": "string", "maxLength": generate.limits["max_prompt_chars"]}
    body = {"type": "object", "required": ["model"], "additionalProperties": False, "properties": {
        "model": {"type": "string", "description": "a served text model (GET /v1/models), or name:version"},
        "prompt": {"oneOf": [prompt, {"type": "array", "minItems": 1, "maxItems": MAX_PROMPTS, "items": prompt}]},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": generate.limits["max_new_tokens"],
                       "default": DEFAULT_MAX_TOKENS},
        "temperature": {"type": "number", "minimum": 0, "maximum": 10, "default": 1.0},
        "top_p": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 1, "default": 1.0},
        "top_k": {"type": "integer", "minimum": 0, "default": 0},
        "n": {"type": "integer", "minimum": 1, "maximum": MAX_CHOICES, "default": 1},
        "stop": {"oneOf": [{"type": "string"}, {"type": "array", "maxItems": 8, "items": {"type": "string"}}]},
        "seed": {"type": "integer", "minimum": 0}, **PENALTIES,
        "stream": {"type": "boolean", "default": False},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "echo": {"type": "boolean", "default": False}, "user": {"type": "string"},
        "logprobs": {"type": "integer", "nullable": True, "description": "not supported: must be null"},
        "best_of": {"type": "integer", "nullable": True, "description": "only equal to n"},
        "suffix": {"type": "string", "nullable": True, "description": "not supported: must be null"},
        "logit_bias": {"type": "object", "nullable": True, "description": "not supported: must be empty"}}}
    completion = {"200": {"description": "a text_completion object, or with stream: text/event-stream chunks then "
                                         "`data: [DONE]`",
                          "content": {"application/json": {"schema": {"type": "object"}},
                                      "text/event-stream": {"schema": {"type": "string"}}}}}
    listing = {"200": {"description": "OpenAI model list", "content": {"application/json": {"schema": {"type": "object"}}}}}
    model = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
    return {"/v1/completions": {"post": {"summary": "OpenAI-compatible completions (the official client works)",
                                         "requestBody": {"required": True,
                                                         "content": {"application/json": {"schema": body}}},
                                         "responses": {**completion, **errors}}},
            "/v1/models": {"get": {"summary": "Served text models (OpenAI format)", "responses": listing}},
            "/v1/models/{model}": {"get": {"summary": "One served text model (OpenAI format)", "parameters": [model],
                                           "responses": {**listing, "404": errors["404"]}}}}


def _oip_paths() -> dict:
    model = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
    version = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}
    tensor = {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
        "name": {"type": "string"}, "datatype": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}},
        "parameters": {"type": "object"}, "data": {}}}
    infer_body = {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"}, "parameters": {"type": "object"}, "inputs": {"type": "array", "items": tensor},
        "outputs": {"type": "array", "items": {"type": "object"}}}}
    ok = {"200": {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}}
    paths = {"/v2": {"get": {"summary": "OIP server metadata", "responses": ok}},
             "/v2/health/live": {"get": {"summary": "OIP liveness", "responses": ok}},
             "/v2/health/ready": {"get": {"summary": "OIP readiness", "responses": {**ok, **_errors(503)}}}}
    for prefix, params in (("/v2/models/{model}", [model]), ("/v2/models/{model}/versions/{version}", [model, version])):
        paths[prefix] = {"get": {"summary": "OIP model metadata", "parameters": params, "responses": {**ok, **_errors(404)}}}
        paths[prefix + "/ready"] = {"get": {"summary": "OIP model readiness", "parameters": params,
                                            "responses": {**ok, **_errors(404, 503)}}}
        paths[prefix + "/infer"] = {"post": {
            "summary": "OIP inference (JSON tensors, or the binary tensor extension with Inference-Header-Content-Length)",
            "parameters": params, "requestBody": {"required": True, "content": {"application/json": {"schema": infer_body}}},
            "responses": {**ok, **_errors(400, 404, 413, 503)}}}
    control = {"type": "object", "properties": {"parameters": {"type": "object", "properties": {
        "version": {"type": "string", "description": "a stored version to pin (default: the newest, followed by "
                                                     "the periodic refresh)"}}}}}
    paths["/v2/repository/index"] = {"post": {
        "summary": "OIP model repository: every stored version and its state (READY / UNAVAILABLE, and why)",
        "requestBody": {"required": False, "content": {"application/json": {"schema": {
            "type": "object", "properties": {"ready": {"type": "boolean"}}}}}}, "responses": ok}}
    paths["/v2/repository/models/{model}/load"] = {"post": {
        "summary": "Load a version in every worker and serve it; the version it replaces finishes its running "
                   "requests first", "parameters": [model],
        "requestBody": {"required": False, "content": {"application/json": {"schema": control}}},
        "responses": {**ok, **_errors(400, 404, 415)}}}
    paths["/v2/repository/models/{model}/unload"] = {"post": {
        "summary": "Unload every version in every worker once its running requests finish", "parameters": [model],
        "responses": {**ok, **_errors(404, 415)}}}
    return paths


def add_openapi_route(app) -> None:
    from services.frontends.asgi import json_response

    async def document(request):
        return json_response(openapi_document(app.plane))

    app.route("/docs.json", document, ("GET",), "docs", body="none")
