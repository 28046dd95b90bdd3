"""The dynamic batcher without a server: ordering, the row limit, the queue delay, shapes that do not
stack, a failing request isolated from its companions, the bounded queue, cancelled requests."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from services.batching import DynamicBatcher
from services.errors import ServingError


class Recorder:
    """A session stand-in: doubles its input, remembers each batch's size, can be held or fail."""

    def __init__(self, delay: float = 0.0):
        self.batches: list[int] = []
        self.entered = 0
        self.delay = delay
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, feeds):
        self.entered += 1
        self.gate.wait(5)
        x = feeds["x"]
        if np.isnan(x).any():
            raise ValueError("NaN in the batch")
        self.batches.append(x.shape[0])
        time.sleep(self.delay)
        return {"y": x * 2}


def run(coro):
    return asyncio.run(coro)


async def hold_first(batcher: DynamicBatcher, model: Recorder) -> asyncio.Future:
    """Starts request 0 and holds it inside the model, so the next requests queue up behind it."""
    model.gate.clear()
    first = asyncio.ensure_future(batcher.submit(rows(0)))
    await asyncio.sleep(0.05)
    return first


def rows(value: float, n: int = 1, width: int = 3) -> dict:
    return {"x": np.full((n, width), value, np.float32)}


def test_each_request_gets_its_own_rows_in_order():
    async def main():
        model = Recorder()
        batcher = DynamicBatcher("m", model, max_batch_size=64)
        first = await hold_first(batcher, model)
        rest = [asyncio.ensure_future(batcher.submit(rows(i, n=1 + i % 3))) for i in range(1, 20)]
        await asyncio.sleep(0.05)
        model.gate.set()
        results = await asyncio.gather(first, *rest)
        await batcher.close()
        return model, results

    model, results = run(main())
    for i, result in enumerate(results):
        assert result["y"].shape == (1 + i % 3 if i else 1, 3)
        np.testing.assert_array_equal(result["y"], 2 * i)
    assert model.batches[0] == 1 and len(model.batches) == 2  # everything that waited ran as one batch
    assert model.batches[1] == sum(1 + i % 3 for i in range(1, 20))


def test_row_limit_splits_batches():
    async def main():
        model = Recorder()
        batcher = DynamicBatcher("m", model, max_batch_size=4)
        model.gate.clear()
        futures = [asyncio.ensure_future(batcher.submit(rows(i))) for i in range(10)]
        await asyncio.sleep(0.05)
        model.gate.set()
        await asyncio.gather(*futures)
        await batcher.close()
        return model

    model = run(main())
    assert max(model.batches) <= 4 and sum(model.batches) == 10


def test_a_request_larger_than_the_limit_runs_alone():
    async def main():
        model = Recorder()
        batcher = DynamicBatcher("m", model, max_batch_size=4)
        out = await batcher.submit(rows(1, n=9))
        await batcher.close()
        return model, out

    model, out = run(main())
    assert model.batches == [9] and out["y"].shape == (9, 3)


def test_queue_delay_gathers_companions():
    async def main():
        model = Recorder()
        batcher = DynamicBatcher("m", model, max_batch_size=8, max_queue_delay_s=1.0)
        futures = []
        for i in range(5):
            futures.append(asyncio.ensure_future(batcher.submit(rows(i))))
            await asyncio.sleep(0.01)
        started = time.monotonic()
        await asyncio.gather(*futures)
        waited = time.monotonic() - started
        await batcher.close()
        return model, waited

    model, waited = run(main())
    assert model.batches == [5]  # one run, although the requests came 10 ms apart
    assert waited < 3.0


def test_full_batch_does_not_wait_for_the_delay():
    async def main():
        model = Recorder()
        batcher = DynamicBatcher("m", model, max_batch_size=4, max_queue_delay_s=5.0)
        started = time.monotonic()
        await asyncio.gather(*(batcher.submit(rows(i)) for i in range(4)))
        elapsed = time.monotonic() - started
        await batcher.close()
        return elapsed

    assert run(main()) < 2.0


def test_shapes_that_do_not_stack_run_separately_and_keep_order():
    async def main():
        model = Recorder()
        batcher = DynamicBatcher("m", model, max_batch_size=64)
        first = await hold_first(batcher, model)
        mixed = [asyncio.ensure_future(batcher.submit(rows(i, width=3 if i % 2 else 5))) for i in range(1, 9)]
        await asyncio.sleep(0.05)
        model.gate.set()
        results = await asyncio.gather(first, *mixed)
        await batcher.close()
        return model, results

    model, results = run(main())
    assert sorted(model.batches) == [1, 4, 4]
    for i, result in enumerate(results[1:], start=1):
        assert result["y"].shape == (1, 3 if i % 2 else 5)
        np.testing.assert_array_equal(result["y"], 2 * i)


def test_a_failing_request_does_not_fail_its_companions():
    async def main():
        model = Recorder()
        batcher = DynamicBatcher("m", model, max_batch_size=64)
        first = await hold_first(batcher, model)
        good = [asyncio.ensure_future(batcher.submit(rows(i))) for i in range(1, 6)]
        bad = asyncio.ensure_future(batcher.submit(rows(float("nan"))))
        await asyncio.sleep(0.05)
        model.gate.set()
        results = await asyncio.gather(first, *good, return_exceptions=True)
        bad_result = await asyncio.gather(bad, return_exceptions=True)
        await batcher.close()
        return results, bad_result[0]

    results, bad = run(main())
    assert all(isinstance(r, dict) for r in results)
    assert [float(r["y"][0, 0]) for r in results] == [2.0 * i for i in range(6)]
    assert isinstance(bad, ValueError)


def test_bounded_queue_refuses_at_once_with_503():
    async def main():
        model = Recorder()
        batcher = DynamicBatcher("m", model, max_batch_size=1, max_queue=3)
        running = await hold_first(batcher, model)  # taken off the queue, running
        waiting = [asyncio.ensure_future(batcher.submit(rows(i))) for i in range(1, 4)]
        await asyncio.sleep(0.01)
        with pytest.raises(ServingError) as info:
            await batcher.submit(rows(9))
        model.gate.set()
        await asyncio.gather(running, *waiting)
        await batcher.close()
        return info.value

    error = run(main())
    assert error.status == 503 and error.retry_after and "waiting" in str(error)


def test_cancelled_requests_are_skipped():
    async def main():
        model = Recorder()
        batcher = DynamicBatcher("m", model, max_batch_size=64)
        first = await hold_first(batcher, model)
        gone = [asyncio.ensure_future(batcher.submit(rows(i))) for i in range(1, 4)]
        kept = asyncio.ensure_future(batcher.submit(rows(7)))
        await asyncio.sleep(0.01)
        for f in gone:
            f.cancel()
        model.gate.set()
        await first
        result = await kept
        await batcher.close()
        return model, result

    model, result = run(main())
    assert model.batches == [1, 1]  # the cancelled three never reached the session
    np.testing.assert_array_equal(result["y"], 14)


def test_close_refuses_waiting_requests():
    async def main():
        model = Recorder()
        batcher = DynamicBatcher("m", model, max_batch_size=1)
        await hold_first(batcher, model)
        waiting = asyncio.ensure_future(batcher.submit(rows(1)))
        await asyncio.sleep(0.01)
        await batcher.close()
        model.gate.set()
        return (await asyncio.gather(waiting, return_exceptions=True))[0]

    error = run(main())
    assert isinstance(error, ServingError) and error.status == 503


class FixedMeter:
    """A CPU meter that always reads the same share (the real one reads the machine)."""

    window_s = 0.01

    def __init__(self, busy: float):
        self.value = busy

    def busy(self) -> float:
        return self.value


@pytest.mark.parametrize("cpu_busy, side_by_side", [(0.3, 2), (1.0, 1)])
def test_concurrency_runs_batches_side_by_side_while_the_cpu_has_room(cpu_busy, side_by_side):
    async def main():
        model = Recorder()
        batcher = DynamicBatcher("m", model, max_batch_size=2, concurrency=2, cpu=FixedMeter(cpu_busy))
        model.gate.clear()
        futures = [asyncio.ensure_future(batcher.submit(rows(i))) for i in range(5)]
        for _ in range(200):  # wait (up to 2 s on a slow machine) for both threads to be inside the model
            await asyncio.sleep(0.01)
            if model.entered >= 2:
                break
        await asyncio.sleep(0.05)
        in_flight = model.entered  # the slots in use; the rest waits in the queue
        model.gate.set()
        results = await asyncio.gather(*futures)
        await batcher.close()
        return model, in_flight, results

    model, in_flight, results = run(main())
    # With every core busy a second batch would only share them: it waits for the first to end.
    assert in_flight == side_by_side and sum(model.batches) == 5 and max(model.batches) <= 2
    assert [float(r["y"][0, 0]) for r in results] == [2.0 * i for i in range(5)]


def test_cpu_meter_reads_this_machine():
    from services.batching import CpuMeter

    meter = CpuMeter(window_s=0.02)
    started = time.perf_counter()
    while time.perf_counter() - started < 0.1:  # one core busy
        pass
    assert 0.0 < meter.busy() <= 1.0


def test_unbatched_runs_each_request_alone():
    async def main():
        model = Recorder(delay=0.01)
        runner = DynamicBatcher("m", model, max_batch_size=1, concurrency=2)  # what batching=false serves
        results = await asyncio.gather(*(runner.submit(rows(i, n=2)) for i in range(6)))
        await runner.close()
        return model, results

    model, results = run(main())
    assert model.batches == [2] * 6
    assert [float(r["y"][0, 0]) for r in results] == [2.0 * i for i in range(6)]
