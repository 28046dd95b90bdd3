"""The text engine: continuous batching over the exported GPT decoder (Orca/vLLM-style iteration
scheduling, without paged memory).

One thread per loaded text model runs the step loop. Between steps it admits waiting requests
(prefilled together, left-padded), then advances every live sequence by one token in one session
run, samples each row with that row's own parameters and generator, hands out text as complete
characters, and retires finished or abandoned rows.

The engine owns what the graph remembers between steps, by the contract's ``decoder``: a GPT's
key/value cache (``KVCache``) or an LSTM's or GRU's recurrent state (``RecurrentState``). Live
sequences occupy rows 0..n-1 of it (a retired row's place is taken by the last one); the scheduling,
sampling and delivery here are the same for both.

Requests come from asyncio front-ends; results go back with one ``call_soon_threadsafe`` per step
and event loop, and a reader that falls behind gets the text of several steps as one chunk."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable

import numpy as np

from contract import ModelContract
from services.errors import ServingError, bad_request, unavailable
from services.guidance import ModelGuidance
from services.textgen import (Chunk, Completion, Detokenizer, RowSampler, SamplingParams, TokenLogprob, TokenTexts,
                              token_logprob)

log = logging.getLogger("services.textengine")
SLOT_BLOCK = 32  # cache slots are added (and dropped) this many at a time
Run = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def whole_blocks(slots: int) -> int:
    """``slots`` rounded up to whole ``SLOT_BLOCK``s."""
    return -(-slots // SLOT_BLOCK) * SLOT_BLOCK


@dataclass(frozen=True)
class EngineLimits:
    max_live: int = 32  # sequences decoded together; more wait
    max_waiting: int = 64  # requests waiting for a row; more are refused (503 / UNAVAILABLE)
    prefill_tokens: int = 2048  # padded prompt tokens prefilled in one session run
    # A reader is woken at most this often (its first and last chunk at once); what arrives in
    # between goes out joined. Fewer wake-ups and writes per token, at the cost of coarser chunks.
    stream_interval_s: float = 0.0
    prompt_logprobs_elements: int = 16_000_000  # prompt tokens x vocabulary of one echo-with-logprobs request (64 MB)


class EngineObserver:
    """What the engine reports (metrics); the default reports nowhere."""

    def sequences(self, live: int, waiting: int) -> None: ...
    def ran(self, rows: int, seconds: float) -> None: ...
    def occupancy(self, fraction: float) -> None: ...
    def first_token(self, seconds: float) -> None: ...
    def finished(self, tokens: int, seconds_per_token: float | None) -> None: ...


class Sequence:
    """One request's row: its prompt, sampler, detokenizer and the chunks waiting for its reader."""

    _ids = itertools.count()

    def __init__(self, engine: "TextEngine", prompt_ids: list[int], params: SamplingParams,
                 loop: asyncio.AbstractEventLoop, matcher=None):
        self.id = next(self._ids)
        self.engine = engine
        self.prompt_ids = prompt_ids
        self.params = params
        self.loop = loop
        self.sampler = RowSampler(params, prompt_ids, engine.vocab)
        self.detokenizer = Detokenizer(engine.tokenizer, params.stop, prompt_ids)
        self.matcher = matcher  # the constraint's llguidance matcher, or None
        # echo with logprobs: each prompt token's log-probability given the ones before it (prefilled alone)
        self.wants_prompt_logprobs = False
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None  # not yet in a chunk
        self.generated = 0
        self.tokens: list[int] = []  # generated so far (a shadow rollout compares them with the candidate's)
        self.last_token = prompt_ids[-1]
        self.finish_reason: str | None = None
        self.error: ServingError | None = None
        self.cancelled = False
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.delivered_at = 0.0  # when its reader was last woken
        self.pending: collections.deque[Chunk] = collections.deque()  # engine thread -> reader
        self.ready = asyncio.Event()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None or self.cancelled

    def cancel(self) -> None:
        """The reader is gone: the engine drops the row before its next step."""
        self.cancelled = True

    # ---- engine thread ----

    def add_token(self, token: int, logits: np.ndarray) -> None:
        """The token chosen from ``logits`` (this row's): ends the sequence at an end-of-text token,
        a stop string, a finished constraint or the length limit; queues the text that became
        complete (with the log-probabilities since the last chunk, when asked)."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        params = self.params
        if self.logprobs is not None:
            self.logprobs.append(token_logprob(logits, token, params.logprobs))
        if token in self.engine.end_ids and not params.ignore_eos:
            self.finish_reason = "stop"
        else:
            self.generated += 1
            self.tokens.append(token)
            self.last_token = token
            if self.matcher is not None and (not self.matcher.consume_token(token) or self.matcher.is_stopped()):
                self.finish_reason = "stop"  # the constraint is complete: nothing but the end may follow
            if self.detokenizer.push(token):
                self.finish_reason = "stop"
            elif self.finish_reason is None and self.generated >= params.max_new_tokens:
                self.finish_reason = "length"
        text = self.detokenizer.take(final=self.finish_reason is not None)
        if text or self.finish_reason is not None:
            logprobs = self.logprobs
            if logprobs is not None:
                self.logprobs = []
            chunk = Chunk(text, self.finish_reason, len(self.prompt_ids), self.generated, logprobs)
            if self.prompt_logprobs is not None:  # with the first chunk
                chunk.prompt_logprobs, self.prompt_logprobs = self.prompt_logprobs, None
            self.pending.append(chunk)

    def fail(self, error: ServingError) -> None:
        self.error = error

    # ---- reader (event loop) ----

    async def chunks(self) -> AsyncIterator[Chunk]:
        """Chunks as they come; what piled up since the last read is joined into one. Leaving the
        loop early (the client went away) frees the row."""
        try:
            while True:
                # Only when woken: the engine decides when a reader gets what piled up. A failed
                # sequence is not waited for (its wake-up may have been taken with an earlier chunk).
                if self.error is None:
                    await self.ready.wait()
                    self.ready.clear()
                if self.pending:
                    text, last, logprobs, prompt_logprobs = [], None, None, None
                    while self.pending:
                        last = self.pending.popleft()
                        text.append(last.text)
                        if last.logprobs is not None:
                            logprobs = (logprobs or []) + last.logprobs
                        prompt_logprobs = prompt_logprobs or last.prompt_logprobs
                    yield Chunk("".join(text), last.finish_reason, last.prompt_tokens, last.completion_tokens, logprobs,
                                prompt_logprobs)
                    if last.finish_reason is not None:
                        return
                elif self.error is not None:
                    raise self.error
        finally:
            if self.finish_reason is None:
                self.cancel()

    async def complete(self) -> Completion:
        text, last, logprobs, prompt_logprobs = [], None, None, None
        async for chunk in self.chunks():
            text.append(chunk.text)
            if chunk.logprobs is not None:
                logprobs = (logprobs or []) + chunk.logprobs
            prompt_logprobs = prompt_logprobs or chunk.prompt_logprobs
            last = chunk
        return Completion("".join(text), last.finish_reason, last.prompt_tokens, last.completion_tokens, logprobs,
                          prompt_logprobs)


@dataclass(eq=False)
class EmbeddingJob:
    """An embedding request: its prompts, where its caller waits, and the vectors so far."""

    prompts: list[list[int]]
    future: asyncio.Future
    vectors: list[np.ndarray] = dataclasses.field(default_factory=list)
    next: int = 0  # the first prompt not run yet


class TextEngine:
    """Continuous batching for one loaded text model. ``run`` is its session's run (feeds ->
    outputs by name); the tokenizer and the limits come from the model's contract and folder."""

    def __init__(self, name: str, run: Run, contract: ModelContract, folder: Path,
                 limits: EngineLimits = EngineLimits(), observer: EngineObserver | None = None):
        from tokenizers import Tokenizer

        if contract.extra.get("decoder", "kv-cache") == "kv-cache" and not any(t.name.startswith("new.") for t in contract.outputs):
            raise ValueError(f"{name} was exported before batched decoding (its graph returns no new.* keys/values); "
                             f"re-export it: python -m export {contract.family}")
        self.name = name
        self.run = run
        self.contract = contract
        extra = contract.extra
        tokenizer_json = (folder / extra["tokenizer_file"]).read_text(encoding="utf-8")
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        # The tokens that end a generation: the model's own list (generation_config.json), else its
        # end-of-text token; an empty prompt starts from the beginning-of-text token, else that.
        self.end_ids = frozenset(extra.get("eos_token_ids") or [self.tokenizer.token_to_id(extra["end_of_text"])])
        bos = extra.get("bos_token_id")
        self.start_token = bos if bos is not None else min(self.end_ids)
        self.vocab = contract.output("logits").shape[-1]
        self.guidance = ModelGuidance(tokenizer_json, self.vocab, sorted(self.end_ids))
        self.token_texts = TokenTexts(self.tokenizer)
        self.window = contract.limits["context_window"]
        self.cap = contract.limits["max_new_tokens"]
        self.max_prompt_chars = contract.limits["max_prompt_chars"]
        self.limits = dataclasses.replace(limits, max_live=min(limits.max_live, contract.max_batch or limits.max_live))
        self.observer = observer or EngineObserver()
        decoder = extra.get("decoder", "kv-cache")
        if decoder not in DECODER_STATES:
            raise ValueError(f"{name}: decoder {decoder!r} is not one this engine keeps ({', '.join(DECODER_STATES)})")
        self._state = DECODER_STATES[decoder](contract, self._run, self.limits.max_live)
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._jobs: collections.deque[EmbeddingJob] = collections.deque()  # embedding requests
        self.pooling = extra.get("pooling", "mean")
        self._live: list[Sequence] = []
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"text-engine-{name}", daemon=True)
        self._thread.start()

    # ---- requests (event loop) ----------------------------------------------------------------

    def tokenize(self, text: str, add_special_tokens: bool = True, field: str = "prompt") -> list[int]:
        """Text -> token ids (special tokens such as a beginning-of-text one added as the model's
        tokenizer adds them, unless the text is a rendered chat, which carries its own)."""
        if len(text) > self.max_prompt_chars:
            raise bad_request(field, f"{len(text)} characters; the limit is {self.max_prompt_chars}")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids if text else []

    def encode_prompt(self, prompt: str | list[int], max_new_tokens: int, field: str = "prompt") -> list[int]:
        """A prompt (text, or token ids already) checked against the window."""
        if isinstance(prompt, str):
            ids = self.tokenize(prompt, field=field)
        else:
            ids = list(prompt)
            if any(not 0 <= i < self.vocab for i in ids):
                raise bad_request(field, f"token ids must be in 0..{self.vocab - 1}")
        if not ids:
            ids = [self.start_token]  # an empty prompt starts a fresh document
        if len(ids) + max_new_tokens > self.window:
            raise bad_request(field, f"{len(ids)} prompt tokens + max_new_tokens {max_new_tokens} exceed the "
                                     f"context window of {self.window} tokens")
        return ids

    def matchers(self, params: list[SamplingParams]) -> list:
        """The constraints' compiled matchers (None where a request has none); 400 for one that
        cannot be met. Compiling takes milliseconds: call it off the event loop."""
        return [self.guidance.matcher(p.guide) if p.guide is not None else None for p in params]

    def submit(self, requests: list[tuple[str | list[int], SamplingParams]], matchers: list | None = None,
               prompt_logprobs: bool = False) -> list[Sequence]:
        """Queues requests (all or none): checks each, refuses with 503 when the waiting room is full.
        Constrained requests need their ``matchers`` (from ``matchers``), compiled beforehand.
        ``prompt_logprobs``: each prompt token's log-probability too (echo with logprobs)."""
        loop = asyncio.get_running_loop()
        sequences = []
        matchers = matchers or [None] * len(requests)
        for (prompt, params), matcher in zip(requests, matchers):
            params.validate(self.cap)
            if params.guide is not None and matcher is None:
                raise ValueError("a constrained request needs its compiled matcher (TextEngine.matchers)")
            seq = Sequence(self, self.encode_prompt(prompt, params.max_new_tokens), params, loop, matcher)
            if prompt_logprobs:
                self._check_prompt_logprobs(len(seq.prompt_ids))
                seq.wants_prompt_logprobs = True
            sequences.append(seq)
        with self._wake:
            if self._closed:
                raise unavailable("model", f"{self.name} is shutting down", retry_after=1)
            if len(self._waiting) + len(sequences) > self.limits.max_waiting:
                raise unavailable("model", f"{self.name} is busy: {len(self._live)} sequences decoding and "
                                           f"{len(self._waiting)} waiting (limit {self.limits.max_waiting})",
                                  retry_after=1)
            self._waiting.extend(sequences)
            self.observer.sequences(len(self._live), len(self._waiting))
            self._wake.notify()
        return sequences

    def _check_prompt_logprobs(self, tokens: int) -> None:
        if not getattr(self._state, "every_position", False):
            raise bad_request("echo", f"{self.name}'s graph cannot return prompt log-probabilities (re-export it)")
        if tokens * self.vocab > self.limits.prompt_logprobs_elements:
            raise bad_request("echo", f"prompt log-probabilities of {tokens} tokens x {self.vocab} vocabulary exceed the "
                                      f"limit of {self.limits.prompt_logprobs_elements} values; shorten the prompt")

    async def embed(self, inputs: list[str | list[int]], field: str = "input") -> tuple[np.ndarray, int]:
        """Embeddings of texts or token-id lists: the model's pooling (mean, or the last token) of its
        last hidden state, L2-normalised, run by the engine thread between decoding steps.
        -> ((len(inputs), hidden) float32, tokens used)."""
        if not hasattr(self._state, "hidden"):
            raise bad_request("model", f"{self.name} has no hidden-state output to embed with")
        prompts = [self.encode_prompt(text, 0, field) for text in inputs]
        future = asyncio.get_running_loop().create_future()
        with self._wake:
            if self._closed:
                raise unavailable("model", f"{self.name} is shutting down", retry_after=1)
            if len(self._jobs) >= self.limits.max_waiting:
                raise unavailable("model", f"{self.name} is busy: {len(self._jobs)} embedding requests waiting",
                                  retry_after=1)
            self._jobs.append(EmbeddingJob(prompts, future))
            self._wake.notify()
        vectors = await future
        return vectors, sum(map(len, prompts))

    def _run_jobs(self) -> None:
        """One run of the first embedding request waiting (at most prefill_tokens padded tokens), so
        a large request takes turns with the decoding steps instead of stalling every stream."""
        with self._wake:
            if not self._jobs:
                return
            job = self._jobs[0]
        if job.future.cancelled():  # its client left
            self._finish_job(job, None, None)
            return
        try:
            run, width = [], 0
            while job.next < len(job.prompts):
                prompt = job.prompts[job.next]
                wider = max(width, len(prompt))
                if run and wider * (len(run) + 1) > self.limits.prefill_tokens:
                    break
                run.append(prompt)
                width = wider
                job.next += 1
            job.vectors.append(self._state.hidden(run, self.pooling))
            if job.next == len(job.prompts):
                result = np.concatenate(job.vectors)
                result /= np.maximum(np.linalg.norm(result, axis=1, keepdims=True), 1e-12)
                self._finish_job(job, result, None)
        except Exception:  # noqa: BLE001 - the caller gets it, the loop goes on
            log.exception("%s: an embedding run failed", self.name)
            self._finish_job(job, None, ServingError(None, "internal error while embedding; the server log has the "
                                                           "details", 500))

    def _finish_job(self, job: "EmbeddingJob", result, error) -> None:
        with self._wake:
            self._jobs.remove(job)
        if result is not None or error is not None:
            try:
                job.future.get_loop().call_soon_threadsafe(_settle, job.future, result, error)
            except RuntimeError:  # that loop has closed: nobody is waiting
                pass

    def admission_error(self) -> ServingError | None:
        """Why a request arriving now would be refused (503), or None; asked before reading its body."""
        if self._closed:
            return unavailable("model", f"{self.name} is shutting down", retry_after=1)
        if len(self._waiting) >= self.limits.max_waiting:
            return unavailable("model", f"{self.name} is busy: {len(self._live)} sequences decoding and "
                                        f"{len(self._waiting)} waiting (limit {self.limits.max_waiting})", retry_after=1)
        return None

    def idle(self) -> bool:
        return not self._waiting and not self._live

    @property
    def live(self) -> int:
        return len(self._live)

    def close(self, timeout: float = 5.0) -> None:
        """Stops the loop; requests still waiting or decoding end with 503."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout)

    # ---- the step loop (engine thread) ---------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._waiting and not self._live and not self._jobs:
                    self._wake.wait()
                if self._closed:
                    break
                admitted = self._admit()
            self._run_jobs()
            try:
                self._retire()
                if admitted:
                    self._prefill(admitted)
                    self._retire()
                if self._live:
                    self._decode()
                    self._retire()
            except Exception:  # noqa: BLE001 - the loop must survive a failed run
                failed = [*self._live, *(s for s in admitted if s not in self._live)]
                log.exception("%s: a decoding step failed; failing its %d sequences", self.name, len(failed))
                for seq in failed:
                    seq.fail(ServingError(None, "internal error while decoding; the server log has the details", 500))
                self._deliver(failed)
                self._state.keep(0)
                with self._wake:
                    self._live = []
                    self.observer.sequences(0, len(self._waiting))
        error = unavailable("model", f"{self.name} is shutting down", retry_after=1)
        with self._wake:
            stranded = [*self._live, *self._waiting]
            self._waiting.clear()
            jobs = list(self._jobs)
        for job in jobs:
            self._finish_job(job, None, error)
        for seq in stranded:
            seq.fail(error)
        self._deliver(stranded)

    def _admit(self) -> list[Sequence]:
        """Waiting requests that fit: free rows, and a bound on padded prefill tokens (called with
        the lock held)."""
        admitted: list[Sequence] = []
        width = 0
        while self._waiting and len(self._live) + len(admitted) < self.limits.max_live:
            seq = self._waiting[0]
            if seq.cancelled:
                self._waiting.popleft()
                continue
            if seq.wants_prompt_logprobs:  # prefilled alone: its every position's logits are returned
                if not admitted:
                    admitted.append(self._waiting.popleft())
                break
            wider = max(width, len(seq.prompt_ids))
            if admitted and wider * (len(admitted) + 1) > self.limits.prefill_tokens:
                break
            width = wider
            admitted.append(self._waiting.popleft())
        if admitted:
            self.observer.sequences(len(self._live) + len(admitted), len(self._waiting))
        return admitted

    def _prefill(self, admitted: list[Sequence]) -> None:
        """Runs the new rows' prompts into the rows after the live ones and samples their first token."""
        every = admitted[0].wants_prompt_logprobs
        logits = self._state.prefill([s.prompt_ids for s in admitted], every)
        if every:
            seq = admitted[0]
            top = seq.params.logprobs or 0
            seq.prompt_logprobs = [None, *(token_logprob(logits[0, i], token, top)
                                           for i, token in enumerate(seq.prompt_ids[1:]))]
        self._live = self._live + admitted
        self._sample(admitted, logits)

    def _decode(self) -> None:
        """One token for every live row."""
        live = self._live
        logits = self._state.decode(np.array([[s.last_token] for s in live], np.int64))
        self.observer.occupancy(len(live) / self.limits.max_live)
        self._sample(live, logits)

    def _run(self, feeds: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        outputs = self.run(feeds)
        self.observer.ran(rows, time.perf_counter() - started)
        return outputs

    def _sample(self, sequences: list[Sequence], logits: np.ndarray) -> None:
        rows = logits[:, -1]
        guided = [i for i, seq in enumerate(sequences) if seq.matcher is not None and not seq.cancelled]
        allowed: dict[int, np.ndarray] = {}
        if guided:  # every constrained row's mask in one parallel call
            allowed = dict(zip(guided, self.guidance.masks([sequences[i].matcher for i in guided])))
        for i, (seq, row) in enumerate(zip(sequences, rows)):
            if not seq.cancelled:
                first = seq.first_token_at is None
                seq.add_token(seq.sampler.next(row, allowed.get(i)), row)
                if first:
                    self.observer.first_token(seq.first_token_at - seq.submitted)
        self._deliver(sequences)

    def _retire(self) -> None:
        """Drops finished, failed and abandoned rows (the last live row moves into each one's
        place), then slot blocks no remaining row uses."""
        live = self._live
        if not any(s.done for s in live):
            return
        now = time.perf_counter()
        for seq in live:
            if seq.done:  # tokens of abandoned rows count too; their time per token does not
                complete = seq.finish_reason is not None and seq.generated > 1
                per_token = (now - seq.first_token_at) / (seq.generated - 1) if complete else None
                self.observer.finished(seq.generated, per_token)
        live = list(live)
        i = 0
        while i < len(live):
            if not live[i].done:
                i += 1
                continue
            last = len(live) - 1
            if i != last:
                self._state.move(last, i)
                live[i] = live[last]
            live.pop()
        self._state.keep(len(live))
        with self._wake:
            self._live = live
            self.observer.sequences(len(self._live), len(self._waiting))

    def _deliver(self, sequences: list[Sequence]) -> None:
        """Wakes the readers that have something new: one hop per event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[Sequence]] = {}
        now = time.perf_counter()
        interval = self.limits.stream_interval_s
        for seq in sequences:
            if seq.error is not None or (seq.pending and (seq.pending[-1].finish_reason is not None
                                                          or now - seq.delivered_at >= interval)):
                seq.delivered_at = now
                by_loop.setdefault(seq.loop, []).append(seq)
        for loop, ready in by_loop.items():
            try:
                loop.call_soon_threadsafe(_set_ready, ready)
            except RuntimeError:  # that loop has closed: nobody is reading
                for seq in ready:
                    seq.cancel()


class KVCache:
    """A GPT's keys/values: per layer and kind one array (rows, heads, slots, head_dim). Row i's
    real slots are its first ``lengths[i]``; the graph reads ``cache[:rows]`` (a view) with
    ``attention_mask`` hiding the rest and returns only the new tokens' keys/values, written into
    each row's next slots. Rows grow in powers of two up to max_live, slots in blocks of
    ``SLOT_BLOCK`` up to the context window; both shrink when far too large."""

    def __init__(self, contract: ModelContract, run: Callable[[dict[str, np.ndarray], int], dict[str, np.ndarray]],
                 max_live: int):
        extra = contract.extra
        self.run, self.max_live = run, max_live
        self.window = contract.limits["context_window"]
        self.n_head, self.head_dim = extra.get("n_kv_head", extra["n_head"]), extra["head_dim"]
        # Graphs since generate's graph_version 4 say which positions' logits to compute
        self._logit_index = any(t.name == "logit_index" for t in contract.inputs)
        self._past_names = [f"past.{i}.{kv}" for i in range(extra["n_layer"]) for kv in ("key", "value")]
        self._new_names = [n.replace("past", "new") for n in self._past_names]
        self._cache = self._allocate(1, SLOT_BLOCK)  # per past name: (rows, heads, slots, head_dim)
        self._lengths = np.zeros(0, np.int64)  # real slots of each live row

    @property
    def every_position(self) -> bool:
        """Whether the graph returns the logits of chosen positions (prompt log-probabilities)."""
        return self._logit_index

    def _fresh(self, prompts: list[list[int]], every_position: bool = False):
        """Left-padded feeds for prompts with no past; -> (feeds, lengths, width)."""
        width = max(len(p) for p in prompts)
        rows = len(prompts)
        ids = np.zeros((rows, width), np.int64)
        positions = np.zeros((rows, width), np.int64)
        lengths = np.array([len(p) for p in prompts], np.int64)
        for i, prompt in enumerate(prompts):
            n = len(prompt)
            ids[i, width - n:] = prompt
            positions[i, width - n:] = np.arange(n)
        mask = (np.arange(width) >= (width - lengths)[:, None]).astype(np.int64)
        empty = np.zeros((rows, self.n_head, 0, self.head_dim), np.float32)
        index = {"logit_index": np.arange(width, dtype=np.int64)} if every_position else self._last(width)
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                 **index, **{name: empty for name in self._past_names}}
        return feeds, lengths, width

    def hidden(self, prompts: list[list[int]], pooling: str) -> np.ndarray:
        """One run of ``prompts`` that leaves the cache alone: their pooled last hidden states."""
        feeds, lengths, width = self._fresh(prompts)
        hidden = self.run(feeds, len(prompts))["hidden"]
        if pooling == "last":
            return hidden[:, -1].astype(np.float32)
        return np.stack([hidden[i, width - n:].mean(axis=0) for i, n in enumerate(lengths)]).astype(np.float32)

    def prefill(self, prompts: list[list[int]], every_position: bool = False) -> np.ndarray:
        """The prompts together (left-padded) into new rows after the live ones; their logits (the
        last position's, or every position's for one prompt)."""
        feeds, lengths, width = self._fresh(prompts, every_position)
        rows = len(prompts)
        outputs = self.run(feeds, rows)
        first = len(self._lengths)
        self._ensure(first + rows, width)
        for cache, name in zip(self._cache, self._new_names):
            new = outputs[name]
            for i, n in enumerate(lengths):
                cache[first + i, :, :n] = new[i, :, width - n:]
        self._lengths = np.concatenate([self._lengths, lengths])
        return outputs["logits"]

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """One token (rows, 1) for every live row; their logits."""
        lengths = self._lengths
        rows, slots = len(lengths), self._cache[0].shape[2]
        mask = np.ones((rows, slots + 1), np.int64)
        mask[:, :slots] = self._slot_index[:slots] < lengths[:, None]
        feeds = {"input_ids": tokens, "attention_mask": mask, "position_ids": lengths[:, None].copy(), **self._last(1),
                 **{name: cache[:rows] for name, cache in zip(self._past_names, self._cache)}}
        outputs = self.run(feeds, rows)
        self._ensure(rows, int(lengths.max()) + 1)
        index = np.arange(rows)
        for cache, name in zip(self._cache, self._new_names):
            cache[index, :, lengths] = outputs[name][:, :, 0]
        self._lengths = lengths + 1
        return outputs["logits"]

    def _last(self, width: int) -> dict[str, np.ndarray]:
        return {"logit_index": np.array([width - 1], np.int64)} if self._logit_index else {}

    def move(self, source: int, target: int) -> None:
        for cache in self._cache:
            cache[target] = cache[source]
        self._lengths[target] = self._lengths[source]

    def keep(self, rows: int) -> None:
        """Only the first ``rows`` rows stay live; shrinks only to half or less, since resizing
        copies the live rows and rows come and go."""
        self._lengths = self._lengths[:rows].copy()
        slots = whole_blocks(int(self._lengths.max()) + 1) if rows else SLOT_BLOCK
        wanted = 1 << max(0, rows - 1).bit_length()
        have_rows, have_slots = self._cache[0].shape[0], self._cache[0].shape[2]
        if slots <= have_slots // 2 or wanted <= have_rows // 4:
            self._resize(min(wanted * 2, have_rows), min(slots, have_slots))

    def _allocate(self, rows: int, slots: int) -> list[np.ndarray]:
        self._slot_index = np.arange(slots)
        return [np.zeros((rows, self.n_head, slots, self.head_dim), np.float32) for _ in self._past_names]

    def _ensure(self, rows: int, slots: int) -> None:
        have_rows, have_slots = self._cache[0].shape[0], self._cache[0].shape[2]
        if rows <= have_rows and slots <= have_slots:
            return
        self._resize(max(have_rows, min(self.max_live, 1 << (rows - 1).bit_length())),
                     max(have_slots, min(self.window, whole_blocks(slots))))

    def _resize(self, rows: int, slots: int) -> None:
        live, keep = len(self._lengths), min(slots, self._cache[0].shape[2])
        resized = self._allocate(rows, slots)
        for old, new in zip(self._cache, resized):
            new[:live, :, :keep] = old[:live, :, :keep]
        self._cache = resized


class RecurrentState:
    """An LSTM's or GRU's state: per part (h, c) one array (rows, layers, hidden), the same size
    however long a row has run. A prefill runs prompts of equal length together from the zero
    state (a recurrent graph has no mask, so padding would enter the state); decoding runs every
    live row's one token. Rows grow in powers of two up to max_live and shrink when far too many."""

    def __init__(self, contract: ModelContract, run: Callable[[dict[str, np.ndarray], int], dict[str, np.ndarray]],
                 max_live: int):
        extra = contract.extra
        self.run, self.max_live = run, max_live
        self._names = [f"state.{part}" for part in extra["state"]]
        self._shape = (extra["n_layer"], extra["hidden"])
        self._rows = 0
        self._arrays = self._allocate(1)

    def prefill(self, prompts: list[list[int]], every_position: bool = False) -> np.ndarray:
        first = self._rows
        self._ensure(first + len(prompts))
        by_length: dict[int, list[int]] = {}
        for i, prompt in enumerate(prompts):
            by_length.setdefault(len(prompt), []).append(i)
        logits: list[np.ndarray | None] = [None] * len(prompts)
        for indices in by_length.values():
            zero = np.zeros((len(indices), *self._shape), np.float32)
            feeds = {"input_ids": np.array([prompts[i] for i in indices], np.int64),
                     **{name: zero for name in self._names}}
            outputs = self.run(feeds, len(indices))
            rows = np.array(indices) + first
            for name, state in zip(self._names, self._arrays):
                state[rows] = outputs["new_" + name]
            for j, i in enumerate(indices):
                logits[i] = outputs["logits"][j]
        self._rows = first + len(prompts)
        return np.stack(logits)

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        rows = self._rows
        outputs = self.run({"input_ids": tokens, **{n: s[:rows] for n, s in zip(self._names, self._arrays)}}, rows)
        for name, state in zip(self._names, self._arrays):
            state[:rows] = outputs["new_" + name]
        return outputs["logits"]

    def move(self, source: int, target: int) -> None:
        for state in self._arrays:
            state[target] = state[source]

    def keep(self, rows: int) -> None:
        self._rows = rows
        wanted = 1 << max(0, rows - 1).bit_length()
        if wanted <= len(self._arrays[0]) // 4:
            self._resize(wanted * 2)

    def _allocate(self, rows: int) -> list[np.ndarray]:
        return [np.zeros((rows, *self._shape), np.float32) for _ in self._names]

    def _ensure(self, rows: int) -> None:
        if rows > len(self._arrays[0]):
            self._resize(min(self.max_live, 1 << (rows - 1).bit_length()))

    def _resize(self, rows: int) -> None:
        resized = self._allocate(rows)
        for old, new in zip(self._arrays, resized):
            new[:self._rows] = old[:self._rows]
        self._arrays = resized


# contract.extra["decoder"] -> what keeps that graph's memory between steps
DECODER_STATES = {"kv-cache": KVCache, "recurrent": RecurrentState}


def _settle(future: asyncio.Future, result, error) -> None:
    if not future.done():
        future.set_exception(error) if error is not None else future.set_result(result)


def _set_ready(sequences: list[Sequence]) -> None:
    for seq in sequences:
        seq.ready.set()
