"""Text generation: native /generate and /generate_stream, OpenAI completions (its own front-end)
and OIP ``text_input``, all through the model's text engine (continuous batching); or the
decoder's own tensors on the Open Inference Protocol, through the batcher like any model."""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Mapping

import numpy as np

from common.runtime import OnnxSession
from contract import DTYPES, ModelContract
from services import chat
from services.batching import DynamicBatcher
from services.config import ServingConfig
from services.errors import bad_request
from services.repository import ModelHandle, StoredVersion
from services.tasks.base import BYTES_DTYPE, EventStream, NativeRoute, TaskHandler, TensorResult, Tensors, json_answer
from services.textengine import EngineLimits, Sequence, TextEngine
from services.textgen import MAX_LOGPROBS, Chunk, Completion, SamplingParams, TokenLogprob, parse_sampling

PENALTIES = {
    "repetition_penalty": {"type": "number", "minimum": 0.01, "maximum": 10, "default": 1.0},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2, "default": 0},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2, "default": 0},
    "ignore_eos": {"type": "boolean", "default": False}}


def _fields(contract: ModelContract | None) -> dict[str, dict]:
    limits = contract.limits if contract is not None else {"max_prompt_chars": 100_000, "max_new_tokens": 4096}
    fields = {
        "prompt": {"type": "string", "maxLength": limits["max_prompt_chars"], "default": ""},
        "max_new_tokens": {"type": "integer", "minimum": 1, "maximum": limits["max_new_tokens"], "default": 64},
        "temperature": {"type": "number", "minimum": 0, "maximum": 10, "default": 1.0},
        "top_k": {"type": "integer", "minimum": 0, "default": 0},
        "top_p": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 1, "default": 1.0},
        "seed": {"type": "integer", "minimum": 0, "maximum": 2 ** 63 - 1},
        "stop": {"type": "array", "maxItems": 8, "items": {"type": "string", "minLength": 1, "maxLength": 100}},
        **PENALTIES,
        "logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS,
                     "description": "each generated token's log-probability, plus this many alternatives"},
        **CONSTRAINTS}
    return fields


# Structured output (services/guidance.py): at most one per request
CONSTRAINTS = {
    "json_schema": {"type": "object", "description": "the output is JSON valid against this schema"},
    "json_object": {"type": "boolean", "description": "the output is a JSON object"},
    "regex": {"type": "string", "maxLength": 32000, "description": "the output matches this regular expression"},
    "grammar": {"type": "string", "maxLength": 32000, "description": "the output follows this Lark grammar"},
    "choice": {"type": "array", "maxItems": 64, "items": {"type": "string", "minLength": 1},
               "description": "the output is one of these strings"}}


def prompt_of(values: Mapping[str, Any]) -> str:
    prompt = values.get("prompt", "")
    if not isinstance(prompt, str):
        raise bad_request("prompt", f"must be a string, got {type(prompt).__name__}")
    return prompt


class TextStream:
    """One generation: the model version that runs it, its seed, and its chunks as they come
    (leaving the iteration early frees its row in the engine)."""

    def __init__(self, model: str, seed: int, sequence: Sequence):
        self.model, self.seed = model, seed
        self._sequence = sequence

    @property
    def prompt_ids(self) -> list[int]:
        return self._sequence.prompt_ids

    def chunks(self) -> AsyncIterator[Chunk]:
        return self._sequence.chunks()

    async def complete(self) -> Completion:
        return await self._sequence.complete()


TEXT_INPUT, TEXT_OUTPUT = "text_input", "text_output"


class TextGeneration(TaskHandler):
    """Text in, text out (native /generate and /generate_stream, OpenAI /v1/completions, OIP
    ``text_input``), all through the model's text engine; or the decoder's own tensors on the Open
    Inference Protocol (through the batcher, like any model)."""

    name = "text-generation"
    default_model = "generate"
    routes = (
        NativeRoute("/generate", "generate", "json", "Complete a prompt; the same seed gives the same text", _fields,
                    json_answer("the completion", {
                        "text": {"type": "string"}, "finish_reason": {"type": "string", "enum": ["length", "stop"]},
                        "usage": {"type": "object"}, "seed": {"type": "integer"}, "model": {"type": "string"}}),
                    cancel_on_disconnect=True),
        NativeRoute("/generate_stream", "generate_stream", "json", "Same as /generate, as server-sent events", _fields,
                    {"200": {"description": "`data: {\"text\": ...}` events, a last one with finish_reason and usage, "
                                            "then `data: [DONE]`",
                             "content": {"text/event-stream": {"schema": {"type": "string"}}}}}),
    )
    runs_long = True

    # A shadow rollout compares whole generations (the same prompt and seed on both), not the decoder's tensors.
    measure, default_min_agreement = "token_agreement", 0.9

    def compare(self, contract: ModelContract, primary: Tensors, candidate: Tensors) -> float | None:
        return None

    @classmethod
    def runners(cls, stored: StoredVersion, session: OnnxSession, config: ServingConfig,
                observer: Any) -> tuple[DynamicBatcher, Any]:
        """The batcher (the decoder's own tensors on the Open Inference Protocol) and the text engine
        (continuous batching of whole generations)."""
        batcher, _ = super().runners(stored, session, config, observer)
        own = config.limits(stored.name)
        limits = EngineLimits(own.text_max_live, own.text_max_waiting, config.text_prefill_tokens,
                              config.text_stream_interval_ms / 1000, config.text_prompt_logprobs_elements)
        return batcher, TextEngine(stored.tag, session.run, session.contract, stored.folder, limits, observer)

    # ---- native routes --------------------------------------------------------------------------

    async def generate(self, handle: ModelHandle, image: None, values: dict[str, Any]) -> dict:
        (stream,) = await self.streams(handle, [(prompt_of(values), values)])
        done = await stream.complete()
        answer = {"text": done.text, "finish_reason": done.finish_reason,
                  "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens},
                  "seed": stream.seed, "model": stream.model}
        if done.logprobs is not None:
            answer["logprobs"] = self.logprob_list(handle, done.logprobs)
        return answer

    @staticmethod
    def logprob_list(handle: ModelHandle, logprobs: list[TokenLogprob]) -> list[dict]:
        """Native and OIP shape: per token its text, id, log-probability and alternatives."""
        text = handle.engine.token_texts
        return [{"token": text(t.token)[0], "id": t.token, "logprob": t.logprob,
                 "top_logprobs": [{"token": text(i)[0], "id": i, "logprob": lp} for i, lp in t.top]} for t in logprobs]

    async def generate_stream(self, handle: ModelHandle, image: None, values: dict[str, Any]) -> EventStream:
        """Checks the request and queues it before returning, so bad input or a full queue is an
        error before any event goes out."""
        (stream,) = await self.streams(handle, [(prompt_of(values), values)])

        async def events():
            async for chunk in stream.chunks():
                payload: dict[str, Any] = {"text": chunk.text}
                if chunk.logprobs is not None:
                    payload["logprobs"] = self.logprob_list(handle, chunk.logprobs)
                if chunk.finish_reason is not None:
                    payload.update(finish_reason=chunk.finish_reason, seed=stream.seed,
                                   usage={"prompt_tokens": chunk.prompt_tokens,
                                          "completion_tokens": chunk.completion_tokens})
                yield payload

        return EventStream(stream.model, events())

    async def streams(self, handle: ModelHandle, requests: list[tuple[str | list[int], Mapping[str, Any]]],
                      prompt_logprobs: bool = False) -> list["TextStream"]:
        """Several generations on one model (a list of prompts, several choices each: what OpenAI
        completions sends), queued all or none; each stream yields its own chunks. Constraints are
        compiled off the event loop first, so a bad one is a 400 before anything is queued."""
        params = [self.sampling(handle, sampling) for _, sampling in requests]
        matchers = None
        if any(p.guide is not None for p in params):
            matchers = await asyncio.to_thread(handle.engine.matchers, params)
        sequences = handle.engine.submit([(prompt, p) for (prompt, _), p in zip(requests, params)], matchers,
                                         prompt_logprobs)
        return [TextStream(handle.tag, p.seed, seq) for p, seq in zip(params, sequences)]

    # ---- what the OpenAI front-end asks of a text model (besides streams) ---------------------------

    def chat_prompt(self, handle: ModelHandle, messages: list[dict], add_generation_prompt: bool = True,
                    variables: dict | None = None, template: str | None = None) -> list[int]:
        """Chat messages -> prompt token ids, by the request's template or the model's own (rendered
        in jinja2's sandbox); the rendered text carries its special tokens, so none are added."""
        extra = handle.contract.extra
        text = chat.render(template or extra.get("chat_template"), handle.name, messages, add_generation_prompt,
                           extra.get("special_tokens"), variables)
        return handle.engine.tokenize(text, add_special_tokens=False, field="messages")

    @staticmethod
    def tokenize(handle: ModelHandle, text: str, add_special_tokens: bool = True) -> list[int]:
        return handle.engine.tokenize(text, add_special_tokens)

    @staticmethod
    def detokenize(handle: ModelHandle, ids: list[int]) -> str:
        engine = handle.engine
        if len(ids) > engine.window or any(not 0 <= i < engine.vocab for i in ids):
            raise bad_request("tokens", f"at most {engine.window} token ids, each in 0..{engine.vocab - 1}")
        return engine.tokenizer.decode(ids, skip_special_tokens=False)

    @staticmethod
    async def embed(handle: ModelHandle, inputs: list[str | list[int]]) -> tuple[np.ndarray, int]:
        """Embeddings of each input (texts or token ids) and the tokens they took."""
        return await handle.engine.embed(inputs)

    @staticmethod
    def token_text(handle: ModelHandle, token: int) -> tuple[str, bytes]:
        return handle.engine.token_texts(token)

    def sampling(self, handle: ModelHandle, values: Mapping[str, Any]) -> SamplingParams:
        """The request's sampling parameters; what it leaves out, the model's generation_config.json sets."""
        return parse_sampling(values, handle.contract.limits["max_new_tokens"],
                              handle.contract.extra.get("sampling_defaults"))

    def check_values(self, contract: ModelContract, feeds: Tensors) -> None:
        vocab = contract.output("logits").shape[-1]
        ids = feeds["input_ids"]
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise bad_request("input_ids", f"token ids must be in 0..{vocab - 1}")
        window = contract.limits["context_window"]
        caches = {a.shape[2] for n, a in feeds.items() if n.startswith("past")}
        if len(caches) > 1:
            raise bad_request("past", f"cache tensors disagree on the past length: {sorted(caches)}")
        past = caches.pop() if caches else 0
        if past + ids.shape[1] > window:
            raise bad_request("input_ids", f"{past} past + {ids.shape[1]} new positions exceed the context window "
                                           f"of {window}")
        mask = feeds["attention_mask"]
        if mask.shape[1] != past + ids.shape[1]:
            raise bad_request("attention_mask", f"{mask.shape[1]} slots given; past + new is {past + ids.shape[1]}")
        index = feeds.get("logit_index")
        if index is not None and index.size and (index.min() < 0 or index.max() >= ids.shape[1]):
            raise bad_request("logit_index", f"positions must be in 0..{ids.shape[1] - 1} (the new tokens')")
        positions = feeds["position_ids"]
        if positions.shape != ids.shape:
            raise bad_request("position_ids", f"shape {list(positions.shape)} given, {list(ids.shape)} expected "
                                              "(that of input_ids)")
        if positions.size and (positions.min() < 0 or positions.max() >= window):
            raise bad_request("position_ids", f"positions must be in 0..{window - 1}")


    def extra_tensors(self, contract: ModelContract) -> tuple[list[dict], list[dict]]:
        return ([{"name": TEXT_INPUT, "datatype": "BYTES", "shape": [1]}],
                [{"name": TEXT_OUTPUT, "datatype": "BYTES", "shape": [1]}])

    def text_request(self, feeds: Tensors) -> str:
        """An OIP ``text_input`` request's prompt (its parameters are the sampling parameters)."""
        extra = [n for n in feeds if n != TEXT_INPUT]
        if extra:
            raise bad_request(extra[0], f"{TEXT_INPUT} is used alone; do not send model tensors with it")
        tensor = feeds[TEXT_INPUT]
        if tensor.dtype != BYTES_DTYPE:
            raise bad_request(TEXT_INPUT, f"datatype {DTYPES.get(tensor.dtype.name, tensor.dtype.name)} given, "
                                          f"BYTES expected")
        if tensor.shape not in ((1,), (1, 1)):
            raise bad_request(TEXT_INPUT, f"shape {list(tensor.shape)} given, [1] or [1, 1] expected")
        try:
            prompt = bytes(tensor.ravel()[0]).decode("utf-8")
        except UnicodeDecodeError:
            raise bad_request(TEXT_INPUT, "prompt is not valid UTF-8") from None
        return prompt

    @staticmethod
    def text_result(text: str, shape: tuple[int, ...], parameters: dict[str, Any]) -> TensorResult:
        tensor = np.empty(shape, dtype=object)
        tensor.ravel()[0] = text.encode("utf-8")
        return TensorResult({TEXT_OUTPUT: tensor}, parameters)

    async def infer_tensors(self, handle: ModelHandle, feeds: Tensors, parameters: Mapping[str, Any]) -> TensorResult:
        if TEXT_INPUT not in feeds:
            return await super().infer_tensors(handle, feeds, parameters)
        prompt = self.text_request(feeds)
        (stream,) = await self.streams(handle, [(prompt, parameters)])
        done = await stream.complete()
        extra = finish_parameters(done, stream.seed)
        if done.logprobs is not None:  # OIP parameters hold no lists: JSON text
            extra["logprobs"] = json.dumps(self.logprob_list(handle, done.logprobs))
        return self.text_result(done.text, feeds[TEXT_INPUT].shape, extra)

    async def stream_tensors(self, handle: ModelHandle, feeds: Tensors,
                             parameters: Mapping[str, Any]) -> AsyncIterator[TensorResult]:
        """Decoupled inference (gRPC ModelStreamInfer): one result per text chunk, the last one with
        the finish reason. Checks the request before returning, so bad input fails the call."""
        if TEXT_INPUT not in feeds:
            return await super().stream_tensors(handle, feeds, parameters)
        prompt = self.text_request(feeds)
        (stream,) = await self.streams(handle, [(prompt, parameters)])
        shape = feeds[TEXT_INPUT].shape

        async def results() -> AsyncIterator[TensorResult]:
            async for chunk in stream.chunks():
                extra = {} if chunk.finish_reason is None else finish_parameters(chunk, stream.seed)
                if chunk.logprobs is not None:
                    extra["logprobs"] = json.dumps(self.logprob_list(handle, chunk.logprobs))
                result = self.text_result(chunk.text, shape, extra)
                result.final = chunk.finish_reason is not None
                yield result

        return results()


def finish_parameters(done: Completion | Chunk, seed: int) -> dict[str, Any]:
    """The response parameters of a finished OIP text request."""
    return {"finish_reason": done.finish_reason, "seed": seed, "prompt_tokens": done.prompt_tokens,
            "completion_tokens": done.completion_tokens}


TASK = TextGeneration
