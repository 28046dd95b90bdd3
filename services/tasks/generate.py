"""Text generation: native /generate and /generate_stream, OpenAI completions (its own front-end)
and OIP ``text_input``, all through the model's text engine (continuous batching); or the
decoder's own tensors on the Open Inference Protocol, through the batcher like any model."""

from __future__ import annotations

from typing import Any, AsyncIterator, Mapping

import numpy as np

from contract import DTYPES, ModelContract
from services.batching import DynamicBatcher
from services.config import ServingConfig
from services.errors import bad_request
from services.repository import ModelHandle, StoredVersion
from services.runtime import OnnxSession
from services.tasks.base import BYTES_DTYPE, EventStream, NativeRoute, TaskHandler, TensorResult, Tensors, json_answer
from services.textengine import EngineLimits, Sequence, TextEngine
from services.textgen import Chunk, Completion, SamplingParams, parse_sampling

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
        **PENALTIES}
    return fields


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

    @classmethod
    def runners(cls, stored: StoredVersion, session: OnnxSession, config: ServingConfig,
                observer: Any) -> tuple[DynamicBatcher, Any]:
        """The batcher (the decoder's own tensors on the Open Inference Protocol) and the text engine
        (continuous batching of whole generations)."""
        batcher, _ = super().runners(stored, session, config, observer)
        own = config.limits(stored.name)
        limits = EngineLimits(own.text_max_live, own.text_max_waiting, config.text_prefill_tokens,
                              config.text_stream_interval_ms / 1000)
        return batcher, TextEngine(stored.tag, session.run, session.contract, stored.folder, limits, observer)

    # ---- native routes --------------------------------------------------------------------------

    async def generate(self, handle: ModelHandle, image: None, values: dict[str, Any]) -> dict:
        (stream,) = self.streams(handle, [(prompt_of(values), values)])
        done = await stream.complete()
        return {"text": done.text, "finish_reason": done.finish_reason,
                "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens},
                "seed": stream.seed, "model": stream.model}

    async def generate_stream(self, handle: ModelHandle, image: None, values: dict[str, Any]) -> EventStream:
        """Checks the request and queues it before returning, so bad input or a full queue is an
        error before any event goes out."""
        (stream,) = self.streams(handle, [(prompt_of(values), values)])

        async def events():
            async for chunk in stream.chunks():
                payload: dict[str, Any] = {"text": chunk.text}
                if chunk.finish_reason is not None:
                    payload.update(finish_reason=chunk.finish_reason, seed=stream.seed,
                                   usage={"prompt_tokens": chunk.prompt_tokens,
                                          "completion_tokens": chunk.completion_tokens})
                yield payload

        return EventStream(stream.model, events())

    def streams(self, handle: ModelHandle, requests: list[tuple[str, Mapping[str, Any]]]) -> list["TextStream"]:
        """Several generations on one model (a list of prompts, several choices each: what OpenAI
        completions sends), queued all or none; each stream yields its own chunks."""
        params = [self.sampling(handle, sampling) for _, sampling in requests]
        sequences = self.submit(handle, [(prompt, p) for (prompt, _), p in zip(requests, params)])
        return [TextStream(handle.tag, p.seed, seq) for p, seq in zip(params, sequences)]

    def sampling(self, handle: ModelHandle, values: Mapping[str, Any]) -> SamplingParams:
        return parse_sampling(values, handle.contract.limits["max_new_tokens"])

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
        positions = feeds["position_ids"]
        if positions.shape != ids.shape:
            raise bad_request("position_ids", f"shape {list(positions.shape)} given, {list(ids.shape)} expected "
                                              "(that of input_ids)")
        if positions.size and (positions.min() < 0 or positions.max() >= window):
            raise bad_request("position_ids", f"positions must be in 0..{window - 1}")

    def submit(self, handle: ModelHandle, requests: list[tuple[str, SamplingParams]]) -> list[Sequence]:
        """Queues generations on the model's engine (all or none); each sequence yields its chunks."""
        return handle.engine.submit(requests)

    async def complete(self, handle: ModelHandle, prompt: str, params: SamplingParams) -> Completion:
        (sequence,) = self.submit(handle, [(prompt, params)])
        return await sequence.complete()

    def extra_tensors(self, contract: ModelContract) -> tuple[list[dict], list[dict]]:
        return ([{"name": TEXT_INPUT, "datatype": "BYTES", "shape": [1]}],
                [{"name": TEXT_OUTPUT, "datatype": "BYTES", "shape": [1]}])

    def text_request(self, handle: ModelHandle, feeds: Tensors, parameters: Mapping[str, Any]) -> tuple[str, SamplingParams]:
        """An OIP ``text_input`` request -> (prompt, sampling parameters)."""
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
        return prompt, self.sampling(handle, parameters)

    @staticmethod
    def text_result(text: str, shape: tuple[int, ...], parameters: dict[str, Any]) -> TensorResult:
        tensor = np.empty(shape, dtype=object)
        tensor.ravel()[0] = text.encode("utf-8")
        return TensorResult({TEXT_OUTPUT: tensor}, parameters)

    async def infer_tensors(self, handle: ModelHandle, feeds: Tensors, parameters: Mapping[str, Any]) -> TensorResult:
        if TEXT_INPUT not in feeds:
            return await super().infer_tensors(handle, feeds, parameters)
        prompt, params = self.text_request(handle, feeds, parameters)
        done = await self.complete(handle, prompt, params)
        return self.text_result(done.text, feeds[TEXT_INPUT].shape, finish_parameters(done, params.seed))

    async def stream_tensors(self, handle: ModelHandle, feeds: Tensors,
                             parameters: Mapping[str, Any]) -> AsyncIterator[TensorResult]:
        """Decoupled inference (gRPC ModelStreamInfer): one result per text chunk, the last one with
        the finish reason. Checks the request before returning, so bad input fails the call."""
        if TEXT_INPUT not in feeds:
            return await super().stream_tensors(handle, feeds, parameters)
        prompt, params = self.text_request(handle, feeds, parameters)
        (sequence,) = self.submit(handle, [(prompt, params)])
        shape = feeds[TEXT_INPUT].shape

        async def results() -> AsyncIterator[TensorResult]:
            async for chunk in sequence.chunks():
                extra = {} if chunk.finish_reason is None else finish_parameters(chunk, params.seed)
                result = self.text_result(chunk.text, shape, extra)
                result.final = chunk.finish_reason is not None
                yield result

        return results()


def finish_parameters(done: Completion | Chunk, seed: int) -> dict[str, Any]:
    """The response parameters of a finished OIP text request."""
    return {"finish_reason": done.finish_reason, "seed": seed, "prompt_tokens": done.prompt_tokens,
            "completion_tokens": done.completion_tokens}


TASK = TextGeneration
