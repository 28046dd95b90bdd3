"""The OpenAPI 3 document of the HTTP front-ends, served at ``/docs.json`` (BentoML's Swagger UI at
``/`` renders it). Limits come from the served models' contracts, so the document states what
the running server enforces."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from services.frontends.openai import TEXT
from services.tasks.base import openapi_errors as _errors
from services.tasks.generate import PENALTIES

if TYPE_CHECKING:
    from services.dataplane import DataPlane

def openapi_document(plane: DataPlane) -> dict:
    paths: dict[str, Any] = {}
    for handler in plane.tasks():
        served = [m["name"] for m in plane.served_models(handler.name)]
        default = plane.default_model(handler.name)
        if handler.routes and (served or default in plane.repository.names):
            contract = plane.repository.contract(default) if default in served else None
            paths.update(handler.openapi(contract, served))
    text = [m["name"] for m in plane.served_models(TEXT)]
    if text:
        paths.update(_openai_paths(plane.repository.contract(plane.default_model(TEXT) or text[0])))
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
