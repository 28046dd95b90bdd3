"""The OpenAI-compatible API on the native API's port, so the official ``openai`` client works
unmodified: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (plain, and streamed as
server-sent events), ``POST /v1/embeddings``, ``GET /v1/models`` and ``GET /v1/models/{model}``,
plus vLLM's ``POST /tokenize`` and ``POST /detokenize``; errors in OpenAI's error-object shape.

Bodies are parsed by the pydantic types of ``openai_types`` (which also make the OpenAPI document).
Sampling, constraints, chat templates, log-probabilities and embeddings are the text task's
(``services.tasks.generate``) and its engine's: this module only renames and reshapes. What the
server cannot honour (tools, logit_bias, suffix, best_of other than n) is a 400 naming the field
rather than silently ignored."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from typing import Any, AsyncIterator

from pydantic import BaseModel, ValidationError

from services.chat import message_dicts
from services.errors import ServingError, bad_request, not_found, unsupported_media
from services.frontends import openai_types as types
from services.frontends.asgi import HttpFrontend, Request, Response, StreamingResponse
from services.textgen import TokenLogprob

TEXT = "text-generation"  # the task this front-end serves
DEFAULT_MAX_TOKENS = 16  # completions without max_tokens, as OpenAI's
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
               413: "invalid_request_error", 415: "invalid_request_error", 503: "server_error"}
SAMPLING = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k", "repetition_penalty", "ignore_eos")


def openai_error(exc: ServingError) -> dict:
    code = ("model_not_found" if exc.status == 404 and exc.field in ("model", "version")
            else "invalid_api_key" if exc.status == 401 else None)
    return {"error": {"message": str(exc), "type": ERROR_TYPES.get(exc.status, "server_error"), "param": exc.field,
                      "code": code}}


def parse(kind: type[BaseModel], body: Any):
    """A request body as its pydantic type; the first problem as a 400 naming its field."""
    if not isinstance(body, dict):
        raise bad_request("body", "must be a JSON object")
    try:
        return kind.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        location = [str(p) for p in error["loc"]]
        field = location[0] if location else "body"
        where = f" (at {'.'.join(location)})" if len(location) > 1 else ""
        message = ("unrecognized request argument" if error["type"] == "extra_forbidden"
                   else error["msg"][0].lower() + error["msg"][1:])
        raise bad_request(field, message + where) from None


def _rename(exc: ServingError) -> ServingError:
    """Names the OpenAI field where the task named its own."""
    if exc.field == "max_new_tokens":
        return ServingError("max_tokens", exc.message, exc.status, exc.retry_after)
    return exc


def constraint(request: types.SamplingFields) -> dict[str, Any]:
    """response_format or structured_outputs -> the task's constraint field (one at most)."""
    given: dict[str, Any] = {}
    fmt = request.response_format
    if fmt is not None and fmt.type == "json_object":
        given = {"json_object": True}
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise bad_request("response_format", "json_schema needs json_schema.schema")
        given = {"json_schema": fmt.json_schema.schema_}
    outputs = request.structured_outputs
    if outputs is not None:
        chosen = {k: v for k, v in (("json_schema", outputs.json_), ("regex", outputs.regex), ("grammar", outputs.grammar),
                                    ("choice", outputs.choice)) if v is not None}
        if len(chosen) != 1:
            raise bad_request("structured_outputs", "exactly one of json, regex, grammar, choice")
        if given:
            raise bad_request("structured_outputs", "give response_format or structured_outputs, not both")
        given = chosen
    return given


def sampling_values(request: types.SamplingFields, max_tokens: int | None, limits: Any) -> dict[str, Any]:
    if request.n > limits.text_max_choices:
        raise bad_request("n", f"must be at most {limits.text_max_choices}, got {request.n}")
    if request.logit_bias:
        raise bad_request("logit_bias", "not supported by this server")
    if request.stream_options is not None and not request.stream:
        raise bad_request("stream_options", "only allowed with stream: true")
    values = {k: getattr(request, k) for k in SAMPLING if getattr(request, k) is not None}
    if request.stop is not None:
        values["stop"] = request.stop
    if max_tokens is not None:
        values["max_new_tokens"] = max_tokens
    return {**values, **constraint(request)}


def choices(values: dict, seed: int | None, n: int) -> list[dict]:
    """n choices' sampling values: choice i uses seed + i."""
    return [{**values, **({"seed": seed + i} if seed is not None else {})} for i in range(n)]


class Head:
    """What every response and chunk of one request repeats."""

    def __init__(self, prefix: str, model: str):
        self.id, self.created, self.model = f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model


def sse(payload: BaseModel | dict) -> bytes:
    body = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return b"data: " + body.encode() + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> types.Usage:
    return types.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                       total_tokens=prompt_tokens + completion_tokens)


class LogprobWriter:
    """Engine log-probabilities -> OpenAI's two shapes, token texts from the model's tokenizer."""

    def __init__(self, handler, handle):
        self.handler, self.handle = handler, handle
        self.offset = 0  # completions' text_offset, running over one choice

    def text(self, token: int) -> tuple[str, bytes]:
        return self.handler.token_text(self.handle, token)

    def completion(self, logprobs: list[TokenLogprob | None], prompt_ids: list[int] = ()) -> types.CompletionLogprobs:
        tokens, values, tops, offsets = [], [], [], []
        for i, entry in enumerate(logprobs):
            token = entry.token if entry is not None else prompt_ids[i]
            text = self.text(token)[0]
            tokens.append(text)
            values.append(entry.logprob if entry is not None else None)
            tops.append({self.text(t)[0]: lp for t, lp in entry.top} if entry is not None else None)
            offsets.append(self.offset)
            self.offset += len(text)
        return types.CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)

    def chat(self, logprobs: list[TokenLogprob]) -> types.ChatLogprobs:
        def top(token: int, logprob: float) -> types.TopLogprob:
            text, raw = self.text(token)
            return types.TopLogprob(token=text, logprob=logprob, bytes=list(raw))

        content = [types.ChatTokenLogprob(**top(e.token, e.logprob).model_dump(),
                                          top_logprobs=[top(t, lp) for t, lp in e.top]) for e in logprobs]
        return types.ChatLogprobs(content=content)


def add_openai_routes(app: HttpFrontend) -> None:
    config = app.config

    async def body(request: Request, kind: type[BaseModel]):
        if request.media_type not in ("", "application/json"):
            raise unsupported_media("content-type", f"send application/json, got {request.media_type}")
        return parse(kind, await request.json())

    async def model_of(request: Request, name: str):
        request.scope["suite.model"] = name.partition(":")[0]
        return await app.plane.task_handle(TEXT, name)

    async def completions(request: Request) -> Response | StreamingResponse:
        req: types.CompletionRequest = await body(request, types.CompletionRequest)
        prompts = _prompts(req.prompt, "prompt", config.text_max_inputs)
        if req.best_of is not None and req.best_of != req.n:
            raise bad_request("best_of", "not supported (only best_of equal to n)")
        if req.suffix is not None:
            raise bad_request("suffix", "not supported by this server")
        try:
            handler, handle = await model_of(request, req.model)
            values = sampling_values(req, req.max_tokens or DEFAULT_MAX_TOKENS, config)
            if req.logprobs is not None:
                values["logprobs"] = req.logprobs
            work = [(p, v) for p in prompts for v in choices(values, req.seed, req.n)]
            streams = await handler.streams(handle, work, prompt_logprobs=bool(req.echo and req.logprobs is not None))
        except ServingError as exc:
            raise _rename(exc) from None
        head = Head("cmpl", streams[0].model)
        echoes = [(p if isinstance(p, str) else handler.detokenize(handle, p)) if req.echo else "" for p in prompts]
        writers = [LogprobWriter(handler, handle) for _ in streams]

        def logprobs_of(i: int, chunk, first: bool) -> types.CompletionLogprobs | None:
            if req.logprobs is None:
                return None
            writer = writers[i]
            if first and req.echo:  # the prompt's tokens first (the first one has no log-probability)
                writer.offset = 0
                head_part = writer.completion(chunk.prompt_logprobs or [], streams[i].prompt_ids)
                rest = writer.completion(chunk.logprobs or [])
                return types.CompletionLogprobs(
                    tokens=head_part.tokens + rest.tokens, token_logprobs=head_part.token_logprobs + rest.token_logprobs,
                    top_logprobs=head_part.top_logprobs + rest.top_logprobs,
                    text_offset=head_part.text_offset + rest.text_offset)
            if first:
                writer.offset = 0
            return writer.completion(chunk.logprobs or [])

        if req.stream:
            return _sse(_completion_events(head, req, streams, echoes, logprobs_of))
        done = await asyncio.gather(*(s.complete() for s in streams))
        out = [types.CompletionChoice(index=i, text=echoes[i // req.n] + d.text, finish_reason=d.finish_reason,
                                      logprobs=logprobs_of(i, d, True)) for i, d in enumerate(done)]
        prompt_tokens = sum(d.prompt_tokens for d in done[::req.n])  # each prompt once, whatever n
        return _json(types.Completion(id=head.id, created=head.created, model=head.model, choices=out,
                                      usage=usage(prompt_tokens, sum(d.completion_tokens for d in done))))

    async def chat(request: Request) -> Response | StreamingResponse:
        req: types.ChatCompletionRequest = await body(request, types.ChatCompletionRequest)
        if req.tools:
            raise bad_request("tools", "tool calling is not supported by this server")
        if req.tool_choice not in (None, "none"):
            raise bad_request("tool_choice", "only none: tool calling is not supported by this server")
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs", "needs logprobs: true")
        if req.chat_template is not None and len(req.chat_template) > types.MAX_TEMPLATE_CHARS:
            raise bad_request("chat_template", f"at most {types.MAX_TEMPLATE_CHARS} characters")
        try:
            handler, handle = await model_of(request, req.model)
            prompt = handler.chat_prompt(handle, message_dicts(req.messages), req.add_generation_prompt,
                                         req.chat_template_kwargs, req.chat_template)
            limits = handle.contract.limits
            asked = req.max_completion_tokens or req.max_tokens
            # Without a limit a chat may use what the context window leaves (vLLM's default), up to the cap.
            room = max(1, min(limits["max_new_tokens"], limits["context_window"] - len(prompt)))
            values = sampling_values(req, asked if asked is not None else room, config)
            if req.logprobs:
                values["logprobs"] = req.top_logprobs or 0
            streams = await handler.streams(handle, [(prompt, v) for v in choices(values, req.seed, req.n)])
        except ServingError as exc:
            raise _rename(exc) from None
        head = Head("chatcmpl", streams[0].model)
        writer = LogprobWriter(handler, handle)
        if req.stream:
            return _sse(_chat_events(head, req, streams, writer))
        done = await asyncio.gather(*(s.complete() for s in streams))
        out = [types.ChatChoice(index=i, message=types.AssistantMessage(content=d.text), finish_reason=d.finish_reason,
                                logprobs=writer.chat(d.logprobs) if d.logprobs is not None else None)
               for i, d in enumerate(done)]
        return _json(types.ChatCompletion(id=head.id, created=head.created, model=head.model, choices=out,
                                          usage=usage(done[0].prompt_tokens, sum(d.completion_tokens for d in done))))

    async def embeddings(request: Request) -> Response:
        req: types.EmbeddingRequest = await body(request, types.EmbeddingRequest)
        inputs = _prompts(req.input, "input", config.text_max_inputs)
        handler, handle = await model_of(request, req.model)
        width = handle.contract.extra.get("hidden")
        if req.dimensions is not None and req.dimensions != width:
            raise bad_request("dimensions", f"{handle.name} embeds in {width} dimensions only")
        vectors, tokens = await handler.embed(handle, inputs)
        data = [types.Embedding(index=i, embedding=base64.b64encode(v.astype("<f4").tobytes()).decode()
                                if req.encoding_format == "base64" else v.tolist()) for i, v in enumerate(vectors)]
        return _json(types.EmbeddingList(data=data, model=handle.tag,
                                         usage=types.EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)))

    async def tokenize(request: Request) -> Response:
        req: types.TokenizeRequest = await body(request, types.TokenizeRequest)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("prompt", "give a prompt or messages (one of them)")
        handler, handle = await model_of(request, req.model)
        if req.messages is not None:
            ids = handler.chat_prompt(handle, message_dicts(req.messages), req.add_generation_prompt)
            if req.add_special_tokens:
                ids = handler.tokenize(handle, handler.detokenize(handle, ids), True)
        else:
            ids = handler.tokenize(handle, req.prompt, req.add_special_tokens is not False)
        strs = [handler.token_text(handle, i)[0] for i in ids] if req.return_token_strs else None
        return _json(types.TokenizeResponse(count=len(ids), max_model_len=handle.contract.limits["context_window"],
                                            tokens=ids, token_strs=strs))

    async def detokenize(request: Request) -> Response:
        req: types.DetokenizeRequest = await body(request, types.DetokenizeRequest)
        handler, handle = await model_of(request, req.model)
        return _json(types.DetokenizeResponse(prompt=handler.detokenize(handle, req.tokens)))

    async def models(request: Request) -> Response:
        return _json(types.ModelList(data=[_model_card(app, m) for m in app.plane.served_models(TEXT)]))

    async def model(request: Request) -> Response:
        name = request.path_params["model"]
        for card in app.plane.served_models(TEXT):
            if card["name"] == name:
                return _json(_model_card(app, card))
        raise not_found("model", f"no text model {name!r}; GET /v1/models lists them")

    streamed = dict(protocol="openai", errors=openai_error, cancel_on_disconnect=True)
    app.route("/v1/completions", completions, **streamed)
    app.route("/v1/chat/completions", chat, **streamed)
    app.route("/v1/embeddings", embeddings, protocol="openai", errors=openai_error)
    app.route("/tokenize", tokenize, protocol="openai", errors=openai_error)
    app.route("/detokenize", detokenize, protocol="openai", errors=openai_error)
    app.route("/v1/models", models, methods=("GET",), protocol="openai", errors=openai_error, body="none")
    app.route("/v1/models/{model}", model, methods=("GET",), protocol="openai", errors=openai_error)


def _prompts(value: Any, field: str, limit: int) -> list[str | list[int]]:
    """OpenAI's prompt/input forms -> a list of prompts (text, or token ids)."""
    if isinstance(value, str):
        prompts: list = [value]
    elif value and all(isinstance(v, int) for v in value):
        prompts = [list(value)]
    else:
        prompts = list(value)
    if not prompts:
        raise bad_request(field, "must not be empty")
    if len(prompts) > limit:
        raise bad_request(field, f"{len(prompts)} prompts; the limit is {limit}")
    return prompts


def _json(payload: BaseModel) -> Response:
    return Response(payload.model_dump_json().encode())


def _sse(events: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(events, b"text/event-stream", headers=[(b"cache-control", b"no-cache")])


def _model_card(app: HttpFrontend, model: dict) -> types.ModelCard:
    window = None
    try:
        window = app.plane.repository.contract(model["name"]).limits.get("context_window")
    except Exception:  # noqa: BLE001 - a card without the window rather than no card
        pass
    return types.ModelCard(id=model["name"], created=model["created"], owned_by="model-suite",
                           root=f"{model['name']}:{model['version']}", max_model_len=window)


async def _completion_events(head: Head, req: types.CompletionRequest, streams: list, echoes: list[str],
                             logprobs_of) -> AsyncIterator[bytes]:
    """A chunk per piece of text of any choice, then the usage chunk when asked for, then
    ``data: [DONE]``. An error after the start goes out as an error event."""
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    last: list = [None] * len(streams)

    def event(index: int, text: str, finish: str | None, logprobs=None) -> bytes:
        choice = types.CompletionChoice(index=index, text=text, finish_reason=finish, logprobs=logprobs)
        return sse(types.Completion(id=head.id, created=head.created, model=head.model, choices=[choice]))

    try:
        started = [False] * len(streams)
        async for index, chunk in _merged(streams):
            first = not started[index]
            started[index] = True
            last[index] = chunk
            yield event(index, (echoes[index // req.n] if first else "") + chunk.text, chunk.finish_reason,
                        logprobs_of(index, chunk, first))
    except ServingError as exc:
        yield sse(openai_error(exc))
    else:
        if include_usage:
            prompt_tokens = sum(c.prompt_tokens for c in last[::req.n])
            yield sse(types.Completion(id=head.id, created=head.created, model=head.model, choices=[],
                                       usage=usage(prompt_tokens, sum(c.completion_tokens for c in last))))
    yield b"data: [DONE]\n\n"


async def _chat_events(head: Head, req: types.ChatCompletionRequest, streams: list, writer: LogprobWriter
                       ) -> AsyncIterator[bytes]:
    """Each choice's role first, then its content deltas (with their log-probabilities when asked),
    the finish reason on its last chunk, the usage chunk when asked for, then ``data: [DONE]``."""
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def event(index: int, delta: types.Delta, finish: str | None = None, logprobs=None) -> bytes:
        choice = types.ChatChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=logprobs)
        return sse(types.ChatCompletionChunk(id=head.id, created=head.created, model=head.model, choices=[choice]))

    last: list = [None] * len(streams)
    try:
        for i in range(len(streams)):
            yield event(i, types.Delta(role="assistant", content=""))
        async for index, chunk in _merged(streams):
            last[index] = chunk
            logprobs = writer.chat(chunk.logprobs) if chunk.logprobs else None
            yield event(index, types.Delta(content=chunk.text), chunk.finish_reason, logprobs)
    except ServingError as exc:
        yield sse(openai_error(exc))
    else:
        if include_usage:
            yield sse(types.ChatCompletionChunk(id=head.id, created=head.created, model=head.model, choices=[],
                                                usage=usage(last[0].prompt_tokens,
                                                            sum(c.completion_tokens for c in last))))
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

