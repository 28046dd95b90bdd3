"""OpenAI-compatible completions on the native API's port: ``POST /v1/completions`` (plain and
streamed as server-sent events), ``GET /v1/models`` and ``GET /v1/models/{model}``, errors in
OpenAI's error-object shape, so the official ``openai`` client works unmodified.

Supported request fields: model, prompt (a string or a list of strings), max_tokens (default 16,
as OpenAI's), temperature, top_p, n (up to ``MAX_CHOICES`` per prompt), stop, seed (choice i of a
prompt uses seed + i), presence_penalty, frequency_penalty, stream, stream_options.include_usage,
echo, user; and, as vLLM accepts them (``extra_body`` in the client), top_k, repetition_penalty and
ignore_eos. logprobs, best_of other than n, suffix and logit_bias are refused with 400 rather than
ignored. The sampling itself is the data plane's: this module only renames and reshapes."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator

from services.errors import ServingError, bad_request, not_found, unsupported_media
from services.frontends.asgi import HttpFrontend, Request, Response, StreamingResponse, json_response

TEXT = "text-generation"  # the task this front-end serves
MAX_CHOICES = 8  # n per prompt
MAX_PROMPTS = 32  # prompts per request
DEFAULT_MAX_TOKENS = 16
SAMPLING = ("temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty", "top_k",
            "repetition_penalty", "ignore_eos")
FIELDS = ("model", "prompt", "max_tokens", "n", "stream", "stream_options", "echo", "user", "logprobs", "best_of",
          "suffix", "logit_bias", *SAMPLING)
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
               413: "invalid_request_error", 415: "invalid_request_error", 503: "server_error"}


def openai_error(exc: ServingError) -> dict:
    code = ("model_not_found" if exc.status == 404 and exc.field in ("model", "version")
            else "invalid_api_key" if exc.status == 401 else None)
    return {"error": {"message": str(exc), "type": ERROR_TYPES.get(exc.status, "server_error"), "param": exc.field,
                      "code": code}}


def _bool(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(name, f"must be true or false, got {value!r}")
    return value


def _int(body: dict, name: str, default: int, low: int, high: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(name, f"must be an integer, got {value!r}")
    if not low <= value <= high:
        raise bad_request(name, f"must be between {low} and {high}, got {value}")
    return value


class CompletionRequest:
    """A /v1/completions body, checked, as the data plane's generation requests."""

    def __init__(self, body: Any):
        if not isinstance(body, dict):
            raise bad_request("body", "must be a JSON object")
        unknown = [k for k in body if k not in FIELDS]
        if unknown:
            raise bad_request(unknown[0], f"unrecognized request argument; supported: {list(FIELDS)}")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise bad_request("model", "required: the name of a served text model (GET /v1/models lists them)")
        self.model = model
        prompt = body.get("prompt", "")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise bad_request("prompt", "must be a string or a non-empty list of strings (token-id prompts are "
                                        "not supported)")
        if len(prompts) > MAX_PROMPTS:
            raise bad_request("prompt", f"{len(prompts)} prompts; the limit is {MAX_PROMPTS}")
        self.prompts = prompts
        self.n = _int(body, "n", 1, 1, MAX_CHOICES)
        best_of = body.get("best_of")
        if best_of is not None and best_of != self.n:
            raise bad_request("best_of", "not supported (only best_of equal to n)")
        for name in ("logprobs", "suffix"):
            if body.get(name) is not None:
                raise bad_request(name, "not supported by this server")
        if body.get("logit_bias"):
            raise bad_request("logit_bias", "not supported by this server")
        user = body.get("user")
        if user is not None and not isinstance(user, str):
            raise bad_request("user", "must be a string")
        self.stream = _bool(body, "stream")
        self.echo = _bool(body, "echo")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict) or any(k != "include_usage" for k in options):
            raise bad_request("stream_options", "must be an object with at most include_usage")
        if options and not self.stream:
            raise bad_request("stream_options", "only allowed with stream: true")
        self.include_usage = _bool(options, "include_usage")
        sampling = {k: body[k] for k in SAMPLING if body.get(k) is not None}
        sampling["max_new_tokens"] = body.get("max_tokens", DEFAULT_MAX_TOKENS)
        if sampling["max_new_tokens"] is None:
            sampling["max_new_tokens"] = DEFAULT_MAX_TOKENS
        seed = sampling.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise bad_request("seed", f"must be an integer, got {seed!r}")
        # Choice i of prompt p: index p * n + i, OpenAI's order; its seed is seed + i.
        self.requests = [(p, {**sampling, **({"seed": seed + i} if seed is not None else {})})
                         for p in prompts for i in range(self.n)]

    def prompt_of(self, index: int) -> str:
        return self.prompts[index // self.n]


def _rename_errors(exc: ServingError) -> ServingError:
    """Names the OpenAI field where the data plane named its own."""
    if exc.field == "max_new_tokens":
        return ServingError("max_tokens", exc.message, exc.status, exc.retry_after)
    return exc


def add_openai_routes(app: HttpFrontend) -> None:
    async def completions(request: Request) -> Response | StreamingResponse:
        if request.media_type not in ("", "application/json"):
            raise unsupported_media("content-type", f"send application/json, got {request.media_type}")
        completion = CompletionRequest(await request.json())
        request.scope["suite.model"] = completion.model.partition(":")[0]
        try:
            handler, handle = await app.plane.task_handle(TEXT, completion.model)
            streams = handler.streams(handle, completion.requests)
        except ServingError as exc:
            raise _rename_errors(exc) from None
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": streams[0].model}
        if completion.stream:
            return StreamingResponse(_events(head, completion, streams), b"text/event-stream",
                                     headers=[(b"cache-control", b"no-cache")])
        done = await asyncio.gather(*(s.complete() for s in streams))
        choices = [{"index": i, "text": (completion.prompt_of(i) if completion.echo else "") + d.text,
                    "logprobs": None, "finish_reason": d.finish_reason} for i, d in enumerate(done)]
        return json_response({**head, "choices": choices, "usage": _usage(completion, done)})

    async def models(request: Request) -> Response:
        return json_response({"object": "list", "data": [_model_card(m) for m in app.plane.served_models(TEXT)]})

    async def model(request: Request) -> Response:
        name = request.path_params["model"]
        for card in app.plane.served_models(TEXT):
            if card["name"] == name:
                return json_response(_model_card(card))
        raise not_found("model", f"no text model {name!r}; GET /v1/models lists them")

    async def chat(request: Request) -> Response:
        raise ServingError(None, "this server has no chat models; use POST /v1/completions", 404)

    app.route("/v1/completions", completions, protocol="openai", errors=openai_error, cancel_on_disconnect=True)
    app.route("/v1/chat/completions", chat, protocol="openai", errors=openai_error)
    app.route("/v1/models", models, methods=("GET",), protocol="openai", errors=openai_error, body="none")
    app.route("/v1/models/{model}", model, methods=("GET",), protocol="openai", errors=openai_error)


def _model_card(model: dict) -> dict:
    return {"id": model["name"], "object": "model", "created": model["created"], "owned_by": "model-suite",
            "root": f"{model['name']}:{model['version']}"}


def _usage(completion: CompletionRequest, done: list) -> dict:
    prompt_tokens = sum(d.prompt_tokens for d in done[::completion.n])  # each prompt once, whatever n
    completion_tokens = sum(d.completion_tokens for d in done)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _events(head: dict, completion: CompletionRequest, streams: list) -> AsyncIterator[bytes]:
    """``data: {chunk}`` per piece of text of any choice, then the usage chunk when asked for, then
    ``data: [DONE]``. An error after the start goes out as an error event."""
    usage_field = ',"usage":null' if completion.include_usage else ""
    prefix = (f'data: {{"id":"{head["id"]}","object":"text_completion","created":{head["created"]},'
              f'"model":{json.dumps(head["model"])},"choices":[{{"index":').encode()

    def event(index: int, text: str, finish: str | None) -> bytes:
        return prefix + (f'{index},"text":{json.dumps(text)},"logprobs":null,'
                         f'"finish_reason":{json.dumps(finish)}}}]{usage_field}}}\n\n').encode()

    last: list = [None] * len(streams)
    try:
        if completion.echo:
            for i in range(len(streams)):
                yield event(i, completion.prompt_of(i), None)
        async for index, chunk in _merged(streams):
            last[index] = chunk
            yield event(index, chunk.text, chunk.finish_reason)
    except ServingError as exc:
        yield b"data: " + json.dumps(openai_error(exc)).encode() + b"\n\n"
    else:
        if completion.include_usage:
            yield b"data: " + json.dumps({**head, "choices": [], "usage": _usage(completion, last)}).encode() + b"\n\n"
    yield b"data: [DONE]\n\n"


async def _merged(streams: list) -> AsyncIterator[tuple[int, Any]]:
    """(choice index, chunk) from every stream as they come; one stream is iterated directly."""
    if len(streams) == 1:
        async for chunk in streams[0].chunks():
            yield 0, chunk
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream) -> None:
        try:
            async for chunk in stream.chunks():
                queue.put_nowait((index, chunk, None))
        except ServingError as exc:
            queue.put_nowait((index, None, exc))
        finally:
            queue.put_nowait((index, None, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, chunk, error = await queue.get()
            if error is not None:
                raise error
            if chunk is None:
                running -= 1
            else:
                yield index, chunk
    finally:
        for task in tasks:
            task.cancel()
