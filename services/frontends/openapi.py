"""The OpenAPI 3 document of the HTTP front-ends, served at ``/docs.json`` (BentoML's Swagger UI at
``/`` renders it). Limits come from the served models' contracts, so the document states what
the running server enforces."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from services.frontends.openai import TEXT
from services.tasks.base import openapi_errors as _errors

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
    schemas: dict[str, Any] = {"Error": {"type": "object", "required": ["error"], "properties": {
        "error": {"type": "string"}, "field": {"type": "string"}}}}
    if text:
        paths.update(_openai_paths(plane.repository.contract(plane.default_model(TEXT) or text[0]), schemas))
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
                                    "OpenAI-compatible completions, chat, embeddings and tokenization."},
            "paths": paths,
            "components": {"schemas": schemas}}


def _openai_paths(generate, schemas: dict) -> dict:
    """The OpenAI-compatible routes, their bodies and answers from the pydantic types that parse
    and write them (``openai_types``); the served default text model's limits added."""
    from services.frontends import openai_types as types

    def ref(model) -> dict:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}", by_alias=True)
        for name, sub in schema.pop("$defs", {}).items():
            schemas[name] = openapi30(sub)
        schemas[model.__name__] = openapi30(schema)
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    error = ref(types.ErrorResponse)
    errors = {str(c): {"description": d, "content": {"application/json": {"schema": error}}}
              for c, d in ((400, "bad request (OpenAI error object naming the field)"), (404, "unknown model"),
                           (503, "busy: retry after Retry-After seconds"))}
    paths = {}
    for path, (request, response, summary) in types.ROUTES.items():
        ok = {"description": summary, "content": {"application/json": {"schema": ref(response)}}}
        if path in ("/v1/completions", "/v1/chat/completions"):
            ok["content"]["text/event-stream"] = {"schema": {"type": "string"}}
        paths[path] = {"post": {"summary": summary, "requestBody": {"required": True, "content": {
            "application/json": {"schema": ref(request)}}}, "responses": {"200": ok, **errors}}}
    for name in ("CompletionRequest", "ChatCompletionRequest"):  # this server's limits
        props = schemas[name]["properties"]
        for key in ("max_tokens", "max_completion_tokens"):
            if key in props:
                props[key]["maximum"] = generate.limits["max_new_tokens"]
    ref(types.ChatCompletionChunk)
    listing = {"200": {"description": "OpenAI model list", "content": {"application/json": {"schema": ref(types.ModelList)}}}}
    card = {"200": {"description": "one model", "content": {"application/json": {"schema": ref(types.ModelCard)}}}}
    model = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
    paths["/v1/models"] = {"get": {"summary": "Served text models (OpenAI format)", "responses": listing}}
    paths["/v1/models/{model}"] = {"get": {"summary": "One served text model (OpenAI format)", "parameters": [model],
                                           "responses": {**card, "404": errors["404"]}}}
    return paths


def openapi30(schema: Any) -> Any:
    """Pydantic's JSON Schema (2020-12) as OpenAPI 3.0 reads it: ``anyOf [X, null]`` becomes X with
    ``nullable``, ``const`` a one-value enum, numeric exclusive bounds the 3.0 boolean form."""
    if isinstance(schema, list):
        return [openapi30(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: openapi30(v) for k, v in schema.items() if k != "title"}
    if "properties" in schema:  # property names are data, not keywords: keep every one
        out["properties"] = {k: openapi30(v) for k, v in schema["properties"].items()}
    for key in ("anyOf", "oneOf"):
        options = out.get(key)
        if options and any(o.get("type") == "null" for o in options):
            rest = [o for o in options if o.get("type") != "null"]
            del out[key]
            if len(rest) == 1 and "$ref" not in rest[0]:
                out.update(rest[0])
            else:
                out[key] = rest
            out["nullable"] = True
    if out.get("type") == "null":
        out = {"nullable": True, "enum": [None]}
    if "const" in out:
        out["enum"] = [out.pop("const")]
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(out.get(bound), (int, float)) and not isinstance(out.get(bound), bool):
            out[plain], out[bound] = out[bound], True
    return out


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
