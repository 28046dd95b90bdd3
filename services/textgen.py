"""Incremental decoding over the exported GPT with its key/value cache, numpy sampling (temperature,
top-k, top-p) from a seeded generator (the same seed gives the same text), and the one parser of
sampling parameters that every front-end uses."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np

from services.errors import bad_request

MAX_STOP_STRINGS, MAX_STOP_CHARS = 8, 100


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def validate(self, cap: int) -> "SamplingParams":
        if not 1 <= self.max_new_tokens <= cap:
            raise bad_request("max_new_tokens", f"must be between 1 and {cap}, got {self.max_new_tokens}")
        if not 0 <= self.temperature <= 10:
            raise bad_request("temperature", f"must be between 0 and 10, got {self.temperature}")
        if self.top_k < 0:
            raise bad_request("top_k", f"must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise bad_request("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2 ** 63:
            raise bad_request("seed", "must be a non-negative 64-bit integer")
        if len(self.stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in self.stop):
            raise bad_request("stop", f"at most {MAX_STOP_STRINGS} non-empty strings of up to {MAX_STOP_CHARS} characters")
        return self


NUMBER_FIELDS = {"max_new_tokens": int, "temperature": float, "top_k": int, "top_p": float, "seed": int}


def parse_sampling(values: Mapping[str, Any], cap: int) -> SamplingParams:
    """Sampling parameters from a JSON body (native /generate) or request parameters (Open Inference
    Protocol, REST or gRPC) -> validated SamplingParams; a missing seed gets a random one, which the
    responses echo. ``stop`` is a string, a list of strings, or a JSON list in a string (gRPC
    parameters cannot hold lists). Unknown keys are the caller's business."""
    numbers: dict[str, Any] = {}
    for key, kind in NUMBER_FIELDS.items():
        value = values.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad_request(key, f"must be a number, got {value!r}")
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise bad_request(key, f"must be an integer, got {value!r}")
            value = int(value)
        elif not np.isfinite(value):
            raise bad_request(key, f"must be a finite number, got {value!r}")
        numbers[key] = kind(value)
    stop = values.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        if stop.startswith("["):
            try:
                stop = json.loads(stop)
            except json.JSONDecodeError:
                raise bad_request("stop", "not a valid JSON list of strings") from None
        else:
            stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise bad_request("stop", "must be a string or a list of strings")
    seed = numbers.pop("seed", None)
    params = SamplingParams(**numbers, seed=seed if seed is not None else secrets.randbits(63), stop=tuple(stop))
    return params.validate(cap)


def sample_next(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """logits (V,) -> token id."""
    if params.temperature == 0:
        return int(np.argmax(logits))
    logits = logits.astype(np.float64) / params.temperature
    if params.top_k:
        kth = np.partition(logits, -min(params.top_k, logits.size))[-min(params.top_k, logits.size)]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, params.top_p)) + 1]
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    return int(rng.choice(probs.size, p=probs))


@dataclass
class Chunk:
    text: str  # new text since the previous chunk
    finish_reason: str | None  # "stop" | "length" | None while running
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class TextGenerator:
    """Decodes one request at a time on the calling thread; ``model`` is a repository handle (its
    ``run_now`` runs the session outside the batcher, its folder holds the tokenizer)."""

    def __init__(self, model: Any):
        from tokenizers import Tokenizer

        self.model = model
        c = model.contract
        self.tokenizer = Tokenizer.from_file(str(model.folder / c.extra["tokenizer_file"]))
        self.end_of_text = self.tokenizer.token_to_id(c.extra["end_of_text"])
        self.cache_shape = (1, c.extra["n_head"], 0, c.extra["head_dim"])
        self.n_layer = c.extra["n_layer"]
        self.window = c.limits["context_window"]
        self.cap = c.limits["max_new_tokens"]
        self.max_prompt_chars = c.limits["max_prompt_chars"]

    def encode_prompt(self, prompt: str, max_new_tokens: int) -> list[int]:
        if len(prompt) > self.max_prompt_chars:
            raise bad_request("prompt", f"{len(prompt)} characters; the limit is {self.max_prompt_chars}")
        ids = self.tokenizer.encode(prompt).ids if prompt else []
        if not ids:
            ids = [self.end_of_text]  # an empty prompt starts a fresh document
        if len(ids) + max_new_tokens > self.window:
            raise bad_request("prompt", f"{len(ids)} prompt tokens + max_new_tokens {max_new_tokens} exceed the "
                                         f"context window of {self.window} tokens")
        return ids

    def stream(self, prompt: str, params: SamplingParams) -> Iterator[Chunk]:
        """Yields text as it becomes complete characters; the last chunk carries the finish reason."""
        params.validate(self.cap)
        ids = self.encode_prompt(prompt, params.max_new_tokens)
        rng = np.random.default_rng(params.seed)
        past = {f"past.{i}.{kv}": np.zeros(self.cache_shape, np.float32) for i in range(self.n_layer) for kv in ("key", "value")}
        feed_ids, position = ids, 0
        generated: list[int] = []
        emitted = ""  # text already yielded
        # Hold back enough characters that a stop string split across tokens is never half-sent.
        holdback = max((len(x) for x in params.stop), default=1) - 1
        text, finish = "", "length"
        for _ in range(params.max_new_tokens):
            outputs = self.model.run_now({
                "input_ids": np.asarray([feed_ids], np.int64),
                "position_ids": np.arange(position, position + len(feed_ids), dtype=np.int64)[None],
                **past,
            })
            position += len(feed_ids)
            past = {name.replace("present", "past"): outputs[name] for name in outputs if name.startswith("present")}
            token = sample_next(outputs["logits"][0, -1], params, rng)
            if token == self.end_of_text:
                finish = "stop"
                break
            generated.append(token)
            feed_ids = [token]
            text = self.tokenizer.decode(generated)
            if text.endswith("\ufffd"):
                continue  # half of a multi-byte character: wait for the rest
            cut = min((i for i in (text.find(x) for x in params.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
                break
            ready = len(text) - holdback
            if ready > len(emitted):
                yield Chunk(text[len(emitted):ready], None, len(ids), len(generated))
                emitted = text[:ready]
        yield Chunk(text[len(emitted):].replace("\ufffd", ""), finish, len(ids), len(generated))

    def complete(self, prompt: str, params: SamplingParams) -> Completion:
        """The whole stream joined: what /generate and the OIP text_output return, so both equal
        the concatenated /generate_stream events for the same seed."""
        chunks = list(self.stream(prompt, params))
        last = chunks[-1]
        return Completion("".join(ch.text for ch in chunks), last.finish_reason, last.prompt_tokens,
                          last.completion_tokens)
