"""Structured output: token-level constrained decoding with llguidance, inside the batched engine.

A request's constraint (a JSON schema, any JSON object, a regular expression, a Lark grammar or a
list of choices) is compiled into an ``LLMatcher`` for the model's tokenizer before the request is
queued, so a constraint that cannot be met is a 400 naming the field and never reaches the engine.
Each step, the engine asks for the allowed tokens of every constrained row at once (llguidance
computes them in parallel, outside the GIL), masks those rows' logits, samples as usual, and feeds
the chosen token back to the matcher.

Why llguidance (measured here, /tmp/cd/measure.py, byte-level BPE on the Python docs, a 4-property
JSON schema): it compiles a grammar in about 1 ms and computes a mask in 21-24 us a token, lazily,
with no index to build; outlines-core builds a regex index ahead (26 ms at a 4k vocabulary, 54 ms at
9k, growing with the vocabulary and the schema) and then masks in 2-3 us. Both masks are small
against a decoding step (milliseconds); llguidance also takes context-free grammars (Lark) and
recursive schemas, and reads the folder's ``tokenizer.json`` as it is, where outlines-core needs a
hand-built byte vocabulary."""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from services.errors import bad_request

MAX_GUIDE_CHARS = 32_000  # a schema, regex or grammar (its text) in one request
MAX_CHOICES = 64
# JSON as json.dumps writes it. llguidance's default allows any whitespace between tokens, which a
# sampling model can fill until it runs out of tokens (seen: a random model at temperature 1 wrote
# 60 tokens of blanks); a schema may still ask for more with its own "x-guidance" options.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class GuideSpec:
    """One request's constraint; ``field`` is the request field it came from (for error messages)."""

    kind: str  # json_schema | json_object | regex | grammar | choice
    source: Any  # the schema (dict), regex or grammar (str), choices (tuple of str); None for json_object
    field: str

    def grammar(self) -> str:
        import llguidance

        if self.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, JSON_STYLE)
        if self.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(self.source, JSON_STYLE)
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.source)
        if self.kind == "choice":
            return llguidance.LLMatcher.grammar_from_regex("|".join(re.escape(c) for c in self.source))
        return llguidance.LLMatcher.grammar_from_lark(self.source)


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise bad_request(field, "must be a non-empty string")
    if len(value) > MAX_GUIDE_CHARS:
        raise bad_request(field, f"{len(value)} characters; the limit is {MAX_GUIDE_CHARS}")
    return value


def schema_spec(schema: Any, field: str) -> GuideSpec:
    """A JSON schema given as an object or as JSON text."""
    if isinstance(schema, str):
        _text(schema, field)
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise bad_request(field, f"not valid JSON: {exc}") from None
    if not isinstance(schema, (dict, bool)):
        raise bad_request(field, "a JSON schema is an object")
    if len(json.dumps(schema)) > MAX_GUIDE_CHARS:
        raise bad_request(field, f"the schema is over {MAX_GUIDE_CHARS} characters")
    return GuideSpec("json_schema", schema, field)


def parse_guide(values: Mapping[str, Any]) -> GuideSpec | None:
    """The native and Open Inference Protocol fields: ``json_schema`` (an object, or JSON text: OIP
    parameters hold no objects), ``json_object`` (true: any JSON object), ``regex``, ``grammar``
    (Lark, llguidance's dialect) and ``choice`` (a list of strings, or a JSON list in a string); at
    most one of them."""
    given = [k for k in ("json_schema", "json_object", "regex", "grammar", "choice") if values.get(k) not in (None, False)]
    if not given:
        return None
    if len(given) > 1:
        raise bad_request(given[1], f"one constraint per request; {given[0]} is given too")
    (key,) = given
    value = values[key]
    if key == "json_schema":
        return schema_spec(value, key)
    if key == "json_object":
        if value is not True:
            raise bad_request(key, f"must be true or false, got {value!r}")
        return GuideSpec("json_object", None, key)
    if key == "choice":
        return choice_spec(value, key)
    return GuideSpec(key, _text(value, key), key)


def choice_spec(value: Any, field: str) -> GuideSpec:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise bad_request(field, "a list of strings, or that list as JSON text") from None
    if (not isinstance(value, list) or not value or len(value) > MAX_CHOICES
            or not all(isinstance(c, str) and c for c in value)):
        raise bad_request(field, f"a list of 1 to {MAX_CHOICES} non-empty strings")
    if sum(map(len, value)) > MAX_GUIDE_CHARS:
        raise bad_request(field, f"the choices are over {MAX_GUIDE_CHARS} characters")
    return GuideSpec("choice", tuple(value), field)


class ModelGuidance:
    """llguidance for one model's tokenizer: matchers for requests, masks for the engine's rows.
    The tokenizer is converted once, on the first constrained request (tens of milliseconds)."""

    def __init__(self, tokenizer_json: str, vocab: int, eos_ids: list[int]):
        self._source, self.vocab, self._eos = tokenizer_json, vocab, eos_ids
        self._tokenizer = None
        self._executor = None
        self._lock = threading.Lock()

    def _ready(self):
        with self._lock:
            if self._tokenizer is None:
                import llguidance

                self._tokenizer = llguidance.LLTokenizer(self._source, n_vocab=self.vocab, eos_token=self._eos)
                self._executor = llguidance.LLExecutor()
        return self._tokenizer

    def matcher(self, spec: GuideSpec):
        """A fresh matcher for ``spec``; a 400 naming the field when the constraint is malformed,
        unsupported or can produce nothing. Compiling takes about a millisecond for common schemas
        (up to a second for huge grammars): callers run it off the event loop."""
        import llguidance
        import llguidance.numpy as lnp

        tokenizer = self._ready()
        try:
            grammar = spec.grammar()
        except ValueError as exc:
            raise bad_request(spec.field, str(exc)) from None
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise bad_request(spec.field, matcher.get_error().strip().splitlines()[0][:500])
        mask = lnp.allocate_token_bitmask(1, self.vocab)
        lnp.fill_next_token_bitmask(matcher, mask, 0)
        if matcher.is_error() or not self._allowed(mask[0]).any():
            raise bad_request(spec.field, "this constraint allows no output at all")
        return matcher

    def masks(self, matchers: list) -> np.ndarray:
        """(len(matchers), vocab) booleans: the tokens each matcher allows next."""
        import llguidance.numpy as lnp

        bitmask = lnp.allocate_token_bitmask(len(matchers), self.vocab)
        lnp.fill_next_token_bitmask_par(self._executor, [(m, i) for i, m in enumerate(matchers)], bitmask)
        return np.stack([self._allowed(row) for row in bitmask])

    def _allowed(self, row: np.ndarray) -> np.ndarray:
        return np.unpackbits(row.view(np.uint8), bitorder="little")[:self.vocab].astype(bool)
