"""Per-request pieces of text generation: the one parser of sampling parameters that every
front-end uses, sampling from one row's logits with that row's own seeded generator and penalties,
and incremental detokenization with stop strings. The step loop that batches rows is
``services.textengine``; nothing here depends on which rows share a batch, so a request's text for
a given seed is the same whatever its companions."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from services.errors import bad_request
from services.guidance import GuideSpec, parse_guide

MAX_STOP_STRINGS, MAX_STOP_CHARS = 8, 100
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs


MIN_REPETITION_PENALTY = 0.01


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # Divides positive logits (multiplies negative ones) of every token already in the prompt or the
    # output (CTRL / transformers); 1 = off.
    repetition_penalty: float = 1.0
    # Subtracted from the logits of tokens already generated: once (presence) or per occurrence
    # (frequency), as OpenAI defines them; 0 = off.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False  # keep going past the end-of-text token (benchmarks), as vLLM's option
    # None: no log-probabilities; k >= 0: each generated token's, plus the k most likely alternatives
    logprobs: int | None = None
    guide: GuideSpec | None = None  # structured output (services/guidance.py)

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
        # Bounded below so that dividing a logit by it stays finite (found by the fuzzer: 5e-324 made
        # the logits infinite and the sampling distribution NaN).
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= 10:
            raise bad_request("repetition_penalty", f"must be between {MIN_REPETITION_PENALTY} and 10, "
                                                    f"got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise bad_request(name, f"must be between -2 and 2, got {getattr(self, name)}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise bad_request("logprobs", f"must be between 0 and {MAX_LOGPROBS}, got {self.logprobs}")
        return self


NUMBER_FIELDS = {"max_new_tokens": int, "temperature": float, "top_k": int, "top_p": float, "seed": int,
                 "repetition_penalty": float, "presence_penalty": float, "frequency_penalty": float, "logprobs": int}
BOOL_FIELDS = ("ignore_eos",)
GUIDE_FIELDS = ("json_schema", "json_object", "regex", "grammar", "choice")
# What a model's generation_config.json may set as defaults (vLLM reads the same ones)
DEFAULTABLE = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty")


def parse_sampling(values: Mapping[str, Any], cap: int, defaults: Mapping[str, Any] | None = None) -> SamplingParams:
    """Sampling parameters from a JSON body (native /generate, OpenAI /v1/completions after renaming)
    or request parameters (Open Inference Protocol, REST or gRPC) -> validated SamplingParams; a
    missing seed gets a random one, which the responses echo. ``stop`` is a string, a list of
    strings, or a JSON list in a string (gRPC parameters cannot hold lists); the constraint fields
    are ``services.guidance.parse_guide``'s. ``defaults`` (the model's own, from its
    generation_config.json) fill what the request leaves out. Unknown keys are the caller's
    business."""
    asked_length = values.get("max_new_tokens") is not None
    if defaults:
        values = {**{k: v for k, v in defaults.items() if k in DEFAULTABLE}, **{k: v for k, v in values.items() if v is not None}}
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
    for key in BOOL_FIELDS:
        value = values.get(key)
        if value is not None:
            if not isinstance(value, bool):
                raise bad_request(key, f"must be true or false, got {value!r}")
            numbers[key] = value
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
    if not asked_length:  # a default (the model's or ours) is clipped to the cap, not refused
        numbers["max_new_tokens"] = min(numbers.get("max_new_tokens", SamplingParams.max_new_tokens), cap)
    seed = numbers.pop("seed", None)
    params = SamplingParams(**numbers, seed=seed if seed is not None else secrets.randbits(63), stop=tuple(stop),
                            guide=parse_guide(values))
    return params.validate(cap)


class RowSampler:
    """Chooses one row's next token: penalties, temperature, top-k, top-p, then one draw from the
    row's own generator (inverse CDF, so one uniform number per token whatever the filters)."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab: int):
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self.seen: np.ndarray | None = None
        if params.repetition_penalty != 1.0:
            self.seen = np.zeros(vocab, bool)
            self.seen[prompt_ids] = True
        self.counts = np.zeros(vocab, np.int32) if params.presence_penalty or params.frequency_penalty else None

    def penalized(self, logits: np.ndarray) -> np.ndarray:
        p = self.params
        if self.seen is None and self.counts is None:
            return logits
        logits = logits.astype(np.float64)
        if self.seen is not None:
            seen = logits[self.seen]
            logits[self.seen] = np.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
        if self.counts is not None:
            logits -= p.frequency_penalty * self.counts + p.presence_penalty * (self.counts > 0)
        return logits

    def next(self, logits: np.ndarray, allowed: np.ndarray | None = None) -> int:
        """logits (V,) -> token id; ``allowed`` (V,) booleans: the only tokens it may choose (a
        constraint's mask). Records the token for the penalties."""
        p = self.params
        logits = self.penalized(logits)
        if allowed is not None:
            logits = np.where(allowed, logits, -np.inf)
        if p.temperature == 0:
            token = int(np.argmax(logits))
        else:
            token = self._draw(logits)
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1
        return token

    def _draw(self, logits: np.ndarray) -> int:
        p = self.params
        logits = logits.astype(np.float64)
        # The largest logit is subtracted before the division: every value is then <= 0, so a tiny
        # temperature sends the others to -inf (greedy in the limit) instead of overflowing to inf - inf.
        with np.errstate(over="ignore"):  # -finite / tiny overflowing to -inf is the intended limit
            scaled = (logits - logits.max()) / p.temperature
        if p.top_k and p.top_k < scaled.size:
            kth = np.partition(scaled, -p.top_k)[-p.top_k]
            scaled = np.where(scaled < kth, -np.inf, scaled)
        probs = np.exp(scaled - scaled.max())
        u = self.rng.random()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cdf = np.cumsum(probs[order])
            keep = int(np.searchsorted(cdf, p.top_p * cdf[-1])) + 1  # smallest prefix holding top_p of the mass
            return int(order[min(int(np.searchsorted(cdf[:keep], u * cdf[keep - 1], side="right")), keep - 1)])
        cdf = np.cumsum(probs)
        return min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), cdf.size - 1)


class Detokenizer:
    """Token ids -> text as it becomes complete characters (the tokenizers library's
    ``DecodeStream``: multi-byte UTF-8 split over byte-level or byte-fallback tokens comes out
    whole, and a SentencePiece word's leading space is kept because the stream starts from the
    prompt's last tokens), plus stop strings. Text that could be the start of a stop string is held
    back until it cannot be. Special tokens are not part of the text."""

    CONTEXT = 8  # prompt tokens the stream starts from (what decoding the first new token depends on)

    def __init__(self, tokenizer: Any, stop: tuple[str, ...], context: list[int] = ()):
        from tokenizers.decoders import DecodeStream

        self.tokenizer = tokenizer
        self.stream = DecodeStream(ids=list(context[-self.CONTEXT:]), skip_special_tokens=True)
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # complete characters decoded so far
        self.sent = 0  # characters of ``text`` handed out

    def push(self, token: int) -> bool:
        """Adds a token; True when a stop string appeared (``text`` is then cut before it)."""
        try:
            added = self.stream.step(self.tokenizer, token)
        except Exception as exc:  # noqa: BLE001 - the library raises a plain Exception
            if "Invalid prefix" not in str(exc):
                raise
            # Bytes that are not UTF-8 (a model may emit them: byte tokens in a bad order) break the
            # stream's state; start a new one from this token, as vLLM does (vllm#17448).
            from tokenizers.decoders import DecodeStream

            self.stream = DecodeStream(skip_special_tokens=True)
            added = self.stream.step(self.tokenizer, token)
        if not added:
            return False  # half of a multi-byte character (or a special token): nothing yet
        start = max(0, len(self.text) - self.holdback)
        self.text += added
        if self.stop:
            cuts = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if cuts:
                self.text = self.text[:min(cuts)]
                return True
        return False

    def take(self, final: bool) -> str:
        """Text not handed out yet; while running, all but what could begin a stop string. An
        unfinished character at the very end is dropped."""
        end = len(self.text) if final else len(self.text) - self.holdback
        if end <= self.sent:
            return ""
        piece = self.text[self.sent:end]
        self.sent = end
        return piece


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model (before penalties, temperature or a
    constraint, as vLLM reports them), and the ``top`` most likely tokens at that position."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """log-softmax of one row of logits at ``token``, plus the ``top`` best (token, logprob)."""
    row = logits.astype(np.float64)
    shifted = row - row.max()
    log_total = np.log(np.exp(shifted).sum())
    best: tuple[tuple[int, float], ...] = ()
    if top:
        ids = np.argpartition(-shifted, top - 1)[:top] if top < row.size else np.arange(row.size)
        ids = ids[np.argsort(-shifted[ids], kind="stable")]
        best = tuple((int(i), float(shifted[i] - log_total)) for i in ids)
    return TokenLogprob(token, float(shifted[token] - log_total), best)


class TokenTexts:
    """A token's own text and bytes, for log-probabilities (OpenAI's ``token`` and ``bytes``): a
    byte-level token's bytes through GPT-2's byte alphabet, a byte-fallback token ``<0xE2>`` as its
    byte, a SentencePiece piece with its word marker as a space. A token that is part of a
    multi-byte character reads as its escaped bytes (``\\xe2\\x80``), as OpenAI writes it."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
        kinds = {decoder.get("type"), *(d.get("type") for d in decoder.get("decoders", []))}
        self.byte_level = "ByteLevel" in kinds
        self._alphabet = {c: b for b, c in _byte_alphabet().items()}
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token: int) -> tuple[str, bytes]:
        hit = self._cache.get(token)
        if hit is None:
            piece = self.tokenizer.id_to_token(token) or ""
            if self.byte_level and all(c in self._alphabet for c in piece):
                raw = bytes(self._alphabet[c] for c in piece)
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                raw = bytes([int(piece[3:5], 16)])
            else:
                raw = piece.replace("\u2581", " ").encode("utf-8")
            hit = self._cache[token] = (raw.decode("utf-8", errors="backslashreplace"), raw)
        return hit


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE's alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@dataclass
class Chunk:
    text: str  # new text since the previous chunk
    finish_reason: str | None  # "stop" | "length" | None while running
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # the tokens generated since the previous chunk (when asked)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # the prompt's (first chunk; the first token's is None)


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
