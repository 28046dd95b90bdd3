"""The text engine without a server, on the quick-profile GPT, LSTM and GRU exported by the
conftest (a key/value cache and two kinds of recurrent state): batched rows of different lengths
decode as each row alone, a seed's text does not depend on the batch companions, a cancelled row is
freed, and the limits hold."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from pathlib import Path

import pytest

from services.errors import ServingError
from services.textengine import EngineLimits, EngineObserver, TextEngine
from services.textgen import SamplingParams
from tests.conftest import RECURRENT

PROMPTS = ["The", "import os\nimport sys\n\ndef main(argv):\n    return", "A list", "Dictionaries are mutable mappings"]


class Recorder(EngineObserver):
    def __init__(self):
        self.rows: list[int] = []
        self.live: list[int] = []

    def ran(self, rows: int, seconds: float) -> None:
        self.rows.append(rows)

    def sequences(self, live: int, waiting: int) -> None:
        self.live.append(live)


@pytest.fixture(scope="module", params=["generate", *RECURRENT])
def model(request, built_models):
    import bentoml

    from common.runtime import OnnxSession

    if request.param in RECURRENT:
        request.getfixturevalue("second_models")
    folder = Path(bentoml.models.get(request.param).path)
    return OnnxSession(folder / "model.onnx", intra_op_threads=1), folder


def engine_for(model, **limits) -> tuple[TextEngine, Recorder]:
    session, folder = model
    recorder = Recorder()
    return TextEngine("generate", session.run, session.contract, folder, EngineLimits(**limits), recorder), recorder


async def generate(engine: TextEngine, prompt: str, **params) -> str:
    (sequence,) = engine.submit([(prompt, SamplingParams(**params))])
    return (await sequence.complete()).text


def test_batched_rows_decode_as_each_alone(model):
    engine, recorder = engine_for(model)

    async def main():
        greedy = dict(max_new_tokens=24, temperature=0, ignore_eos=True)
        alone = [await generate(engine, p, **greedy) for p in PROMPTS]
        together = await asyncio.gather(*(generate(engine, p, **greedy) for p in PROMPTS))
        return alone, together

    try:
        alone, together = asyncio.run(main())
    finally:
        engine.close()
    assert together == alone
    assert max(recorder.rows) == len(PROMPTS)  # they did share session runs


def test_seeded_text_ignores_batch_companions(model):
    engine, recorder = engine_for(model)

    async def main():
        params = dict(max_new_tokens=30, temperature=0.9, top_p=0.95, repetition_penalty=1.2, seed=123)
        alone = await generate(engine, PROMPTS[1], **params)
        # The same request among others with other prompts, seeds and parameters, started at once
        # and (the second time) after the others are already decoding: a different age in the batch.
        crowd = [generate(engine, p, max_new_tokens=40, temperature=1.0, seed=i) for i, p in enumerate(PROMPTS)]
        first = await asyncio.gather(generate(engine, PROMPTS[1], **params), *crowd)
        late = [asyncio.ensure_future(generate(engine, p, max_new_tokens=60, seed=9, ignore_eos=True)) for p in PROMPTS]
        await asyncio.sleep(0.05)
        second = await generate(engine, PROMPTS[1], **params)
        await asyncio.gather(*late)
        return alone, first[0], second

    try:
        alone, first, second = asyncio.run(main())
    finally:
        engine.close()
    assert first == alone and second == alone
    assert max(recorder.rows) > 1


def test_cancelled_row_is_freed_and_others_finish(model):
    engine, recorder = engine_for(model)

    async def main():
        long = dict(max_new_tokens=100, temperature=1.0, seed=1, ignore_eos=True)
        (abandoned,) = engine.submit([(PROMPTS[0], SamplingParams(**long))])
        (kept,) = engine.submit([(PROMPTS[2], SamplingParams(**long))])
        chunks = abandoned.chunks()
        await chunks.__anext__()  # decoding has started
        await chunks.aclose()  # the reader leaves, as a disconnected client's stream does
        done = await kept.complete()
        for _ in range(200):  # the engine retires rows right after handing out their last chunk
            if engine.live == 0:
                break
            await asyncio.sleep(0.01)
        return abandoned, done

    try:
        abandoned, done = asyncio.run(main())
    finally:
        engine.close()
    assert abandoned.cancelled and abandoned.generated < 100
    assert done.completion_tokens == 100
    assert engine.live == 0


def test_limits_refuse_and_bound_the_batch(model):
    engine, recorder = engine_for(model, max_live=2, max_waiting=3)

    async def main():
        params = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
        with pytest.raises(ServingError) as refused:
            engine.submit([(p, params) for p in PROMPTS])  # 4 > 3 waiting: all refused, none queued
        sequences = engine.submit([(p, params) for p in PROMPTS[:3]])
        return refused.value, await asyncio.gather(*(s.complete() for s in sequences))

    try:
        refused, texts = asyncio.run(main())
    finally:
        engine.close()
    assert refused.status == 503 and refused.retry_after
    assert all(t.completion_tokens == 20 for t in texts)
    assert max(recorder.rows) == 2 and max(recorder.live) <= 2  # never more than max_live rows decoding


def test_bad_requests_and_close(model):
    engine, _ = engine_for(model)

    async def main():
        with pytest.raises(ServingError) as too_long:
            engine.submit([("word " * (engine.window + 1), SamplingParams(max_new_tokens=10))])
        with pytest.raises(ServingError) as too_many:
            engine.submit([("x", SamplingParams(max_new_tokens=10_000))])
        (pending,) = engine.submit([("x", SamplingParams(max_new_tokens=100, ignore_eos=True))])
        started = time.monotonic()
        await asyncio.get_running_loop().run_in_executor(None, engine.close)
        with pytest.raises(ServingError) as closed:
            await pending.complete()
        return too_long.value, too_many.value, closed.value, time.monotonic() - started

    too_long, too_many, closed, _ = asyncio.run(main())
    assert (too_long.status, too_long.field) == (400, "prompt")
    assert (too_many.status, too_many.field) == (400, "max_new_tokens")
    assert closed.status == 503


def test_stream_interval_joins_chunks_without_changing_text(model):
    """What the interval guarantees, without depending on how fast the reader wakes: the engine is
    driven in lock-step with its reader (each decoding step waits until the reader has taken the
    previous chunk), so at interval 0 every token is its own chunk, and at 60 s the first chunk goes
    out at once and the rest with the last."""
    tokens = 30

    def lockstep(limits_interval: float) -> tuple[TextEngine, threading.Semaphore]:
        session, folder = model
        taken = threading.Semaphore(0)
        runs = itertools.count()

        def run(feeds):
            # Every step after the first waits for the reader (bounded, so a chunk that is never
            # woken, as at the 60 s interval, only slows the test down to the timeout).
            if next(runs) and limits_interval == 0:
                taken.acquire(timeout=10)
            return session.run(feeds)

        engine = TextEngine("generate", run, session.contract, folder, EngineLimits(stream_interval_s=limits_interval))
        return engine, taken

    async def chunks(engine: TextEngine, taken: threading.Semaphore) -> list[str]:
        params = SamplingParams(max_new_tokens=tokens, temperature=0, ignore_eos=True)
        (sequence,) = engine.submit([(PROMPTS[0], params)])
        out = []
        async for chunk in sequence.chunks():
            out.append(chunk.text)
            taken.release()
        return out

    every, every_taken = lockstep(0.0)
    joined, joined_taken = lockstep(60.0)
    try:
        per_token = asyncio.run(chunks(every, every_taken))
        coarse = asyncio.run(chunks(joined, joined_taken))
    finally:
        every.close()
        joined.close()
    assert "".join(per_token) == "".join(coarse)
    # One chunk per token whose text is complete (a token ending inside a UTF-8 character waits
    # for the next one), and never more chunks than tokens.
    assert tokens // 2 < len(per_token) <= tokens
    # The first piece at once, the rest with the last: two wake-ups, or one when the whole text was
    # decoded before the reader ran after the first.
    assert len(coarse) in (1, 2)


def test_failed_run_fails_its_sequences_and_the_engine_goes_on(model):
    session, folder = model
    runs = {"n": 0}

    def flaky(feeds):
        runs["n"] += 1
        if runs["n"] == 3:  # prefill, one decoding step, then a failure
            raise RuntimeError("injected")
        return session.run(feeds)

    engine = TextEngine("generate", flaky, session.contract, folder, EngineLimits())

    async def main():
        with pytest.raises(ServingError) as failed:
            await generate(engine, PROMPTS[0], max_new_tokens=10, ignore_eos=True)
        return failed.value, await generate(engine, PROMPTS[0], max_new_tokens=10, temperature=0, ignore_eos=True)

    try:
        error, text = asyncio.run(main())
    finally:
        engine.close()
    assert error.status == 500 and "Traceback" not in str(error)
    assert text  # the next request is served as usual
