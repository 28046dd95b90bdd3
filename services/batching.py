"""Dynamic batching inside the serving process (Triton's dynamic batcher, in asyncio).

Requests for one model version wait in a bounded queue; one runner task stacks the waiting
requests whose inputs have the same per-row shape into one session run of at most
``max_batch_size`` rows, runs it on a thread of its own (ONNX Runtime releases the GIL, so the
event loop keeps accepting requests meanwhile) and hands each request its rows of the outputs.
While a batch runs, the next one gathers: at low load a request runs at once, at high load the
batches fill up. ``max_queue_delay`` makes an idle model wait that long for companions.

Every input and output is batch-major (axis 0). A request may carry several rows. When a batch
run fails, its requests are run again one by one, so one bad request never fails its companions.
With ``max_batch_size=1`` every request runs alone, ``concurrency`` of them at a time: what
``batching=false`` serves, for comparison.

A second batch of one model starts beside a running one only while the CPU has room (``CpuMeter``):
it lets a worker use a core another worker leaves idle (denoise at 8 connections: 58 -> 96 req/s),
but when every core is busy it only adds threads to share them (an imported ResNet-50 at 32
connections: 19.0 images/s with two batches at a time, 21.3 with one, and twice the p99).

Admission: a request is refused at once (503 + Retry-After) when ``max_queue`` requests are waiting
or when its expected wait is over ``max_queue_wait_s``: the longer of how long the oldest waiting
request has waited and the queued rows times the recent time per row. Refusing on arrival costs
next to nothing; a request that waits out its client's patience costs a whole request for nothing."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from services import tracing
from services.errors import ServingError, unavailable

log = logging.getLogger("services.batching")
Tensors = dict[str, np.ndarray]


class BatchObserver(Protocol):
    def queued(self, depth: int) -> None: ...

    def ran(self, rows: int, seconds: float) -> None: ...


class _NoObserver:
    def queued(self, depth: int) -> None:
        pass

    def ran(self, rows: int, seconds: float) -> None:
        pass


@dataclass
class _Pending:
    feeds: Tensors
    rows: int
    key: tuple  # requests with equal keys (names, per-row shapes, dtypes) stack
    future: asyncio.Future = field(repr=False)
    queued_at: float = 0.0  # time.monotonic()
    span: Any = None  # its queue span (tracing on)


def stack_key(feeds: Tensors) -> tuple:
    return tuple((name, array.shape[1:], array.dtype.str) for name, array in sorted(feeds.items()))


def batch_rows(feeds: Tensors) -> int:
    rows = {array.shape[0] if array.ndim else 0 for array in feeds.values()}
    if len(rows) != 1 or 0 in rows:
        raise ValueError(f"inputs disagree on the batch axis or have none: {sorted(rows)}")
    return rows.pop()


class CpuMeter:
    """How busy the cores this process may use are, over the last ``window_s`` or more: the
    cgroup's CPU time against its quota where one is set (a Kubernetes CPU limit), else the
    kernel's per-CPU counters for the CPUs in this process's affinity. Read at most once a window
    (a /proc read is tens of microseconds)."""

    def __init__(self, window_s: float = 0.05, cgroup_root: str = "/sys/fs/cgroup"):
        import os

        from common.resources import cgroup_cpu_quota

        self.window_s = window_s
        self._quota = cgroup_cpu_quota(cgroup_root)
        self._cgroup_stat = f"{cgroup_root}/cpu.stat"
        try:
            self._cpus = {f"cpu{c}" for c in os.sched_getaffinity(0)}
        except AttributeError:
            self._cpus = set()
        self._last = (time.monotonic(), *self._counters())
        self._busy = 0.0

    def _counters(self) -> tuple[float, float]:
        """(busy CPU seconds, available CPU seconds) so far; (0, 0) when unreadable."""
        try:
            if self._quota is not None:
                with open(self._cgroup_stat) as f:
                    usage = next(int(line.split()[1]) for line in f if line.startswith("usage_usec"))
                return usage / 1e6, time.monotonic() * self._quota
            busy = total = 0
            with open("/proc/stat") as f:
                for line in f:
                    name, *fields = line.split()
                    if name in self._cpus:
                        ticks = [int(x) for x in fields[:8]]
                        total += sum(ticks)
                        busy += sum(ticks) - ticks[3] - ticks[4]  # less idle and iowait
            return busy, total
        except (OSError, StopIteration, ValueError):
            return 0.0, 0.0

    def busy(self) -> float:
        """The share of the available CPU in use (0..1) over the last window."""
        now = time.monotonic()
        if now - self._last[0] >= self.window_s:
            busy, total = self._counters()
            if total > self._last[2]:
                self._busy = min(1.0, (busy - self._last[1]) / (total - self._last[2]))
            self._last = (now, busy, total)
        return self._busy


_METER: CpuMeter | None = None


def cpu_meter() -> CpuMeter:
    """The process's one meter (every batcher asks the same)."""
    global _METER
    if _METER is None:
        _METER = CpuMeter()
    return _METER


class DynamicBatcher:
    # A second concurrent batch starts only while the CPU is less busy than this.
    CPU_ROOM = 0.8

    def __init__(self, name: str, run: Callable[[Tensors], Tensors], *, max_batch_size: int,
                 max_queue_delay_s: float = 0.0, max_queue: int = 256, max_queue_wait_s: float = 0.0,
                 concurrency: int = 1, observer: BatchObserver | None = None, cpu: CpuMeter | None = None):
        if max_batch_size < 1 or max_queue < 1 or max_queue_delay_s < 0 or max_queue_wait_s < 0 or concurrency < 1:
            raise ValueError("max_batch_size, max_queue and concurrency must be >= 1, max_queue_delay_s and "
                             "max_queue_wait_s >= 0")
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue = max_queue
        self.max_queue_wait_s = max_queue_wait_s  # 0 = no time budget
        self._row_seconds = 0.0  # recent session time per row (moving average), for the expected wait
        self._queued_rows = 0
        self._run = run
        self._observer = observer or _NoObserver()
        self._queue: deque[_Pending] = deque()
        self._wakeup: asyncio.Event | None = None
        self._runner: asyncio.Task | None = None
        # ``concurrency`` batches in flight per model and worker (one thread each); the next gathers meanwhile.
        self._executor = ThreadPoolExecutor(concurrency, thread_name_prefix=f"batch-{name}")
        self._closed = False
        self._running = 0  # batches in the executor
        self.concurrency = concurrency
        self._cpu = cpu if cpu is not None or concurrency == 1 else cpu_meter()
        self._finished: asyncio.Event | None = None  # set whenever a batch ends

    async def submit(self, feeds: Tensors) -> Tensors:
        """Queues one request (validated inputs, batch-major) and waits for its rows of the outputs.
        Refused with 503 at once when ``max_queue`` requests are already waiting."""
        refusal = self.admission_error()
        if refusal is not None:
            raise refusal
        loop = asyncio.get_running_loop()
        if self._runner is None:
            self._wakeup = asyncio.Event()
            self._runner = loop.create_task(self._run_forever(), name=f"batcher-{self.name}")
        future = loop.create_future()
        rows = batch_rows(feeds)
        span = tracing._tracer and tracing.start_queue_span(self.name, rows)
        self._queue.append(_Pending(feeds, rows, stack_key(feeds), future, time.monotonic(), span))
        self._queued_rows += rows
        self._observer.queued(len(self._queue))
        self._wakeup.set()
        return await future  # cancelled with the request: the runner skips it

    def expected_wait(self) -> float:
        """Seconds a request arriving now is expected to wait before its batch starts."""
        if not self._queue:
            return 0.0
        waited = time.monotonic() - self._queue[0].queued_at
        return max(waited, self._queued_rows * self._row_seconds / self.concurrency)

    def admission_error(self) -> ServingError | None:
        """Why a request arriving now would be refused (503), or None; cheap enough to ask before
        reading a request's body."""
        if self._closed:
            return unavailable(None, f"model {self.name} is unloading", retry_after=1)
        if len(self._queue) >= self.max_queue:
            return unavailable(None, f"model {self.name} has {len(self._queue)} requests waiting, the most it "
                                     f"queues; retry later", retry_after=1)
        if self.max_queue_wait_s:
            wait = self.expected_wait()
            if wait > self.max_queue_wait_s:
                return unavailable(None, f"model {self.name} is overloaded: a request would wait about "
                                         f"{wait * 1000:.0f} ms, over the {self.max_queue_wait_s * 1000:.0f} ms "
                                         f"budget; retry later", retry_after=max(1.0, wait))
        return None

    def idle(self) -> bool:
        """Nothing waiting and no batch running."""
        return not self._queue and self._running == 0

    async def close(self) -> None:
        """Stops the runner; requests still waiting are refused with 503."""
        self._closed = True
        if self._runner is not None:
            self._runner.cancel()
            try:
                await self._runner
            except asyncio.CancelledError:
                pass
        self._queued_rows = 0
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(unavailable(None, f"model {self.name} is unloading", retry_after=1))
        self._executor.shutdown(wait=False)

    # ---- the runner -------------------------------------------------------------------------------

    async def _run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self.concurrency)
        running: set[asyncio.Task] = set()
        try:
            while True:
                while not self._queue:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                await slots.acquire()  # while every slot is busy, the queue keeps filling
                await self._room_for_another(running)
                if self.max_queue_delay_s > 0:
                    await self._gather(loop)
                batch = self._take()
                self._observer.queued(len(self._queue))
                if not batch:
                    slots.release()
                    continue
                task = loop.create_task(self._execute(loop, batch))
                running.add(task)
                task.add_done_callback(lambda t: (running.discard(t), slots.release(), self._finished.set()))
        finally:
            for task in running:
                task.cancel()

    async def _room_for_another(self, running: set) -> None:
        """With a batch of this model running, the next one waits until that one ends or the CPU
        has room for it."""
        if self._finished is None:
            self._finished = asyncio.Event()
        while running and self._cpu is not None and self._cpu.busy() >= self.CPU_ROOM:
            self._finished.clear()
            try:
                await asyncio.wait_for(self._finished.wait(), self._cpu.window_s)
            except asyncio.TimeoutError:
                pass

    async def _gather(self, loop: asyncio.AbstractEventLoop) -> None:
        """Waits up to the delay for enough rows to fill a batch."""
        deadline = loop.time() + self.max_queue_delay_s
        while sum(item.rows for item in self._queue) < self.max_batch_size:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _take(self) -> list[_Pending]:
        """The oldest live request plus every later one that stacks with it, up to the row limit;
        the others keep their places."""
        queue = self._queue
        while queue and queue[0].future.done():  # cancelled while waiting
            self._queued_rows -= queue.popleft().rows
        if not queue:
            return []
        first = queue.popleft()
        batch, rows, kept = [first], first.rows, deque()
        while queue and rows < self.max_batch_size:
            item = queue.popleft()
            if item.future.done():
                self._queued_rows -= item.rows
                continue
            if item.key == first.key and rows + item.rows <= self.max_batch_size:
                batch.append(item)
                rows += item.rows
            else:
                kept.append(item)
        kept.extend(queue)
        self._queue = kept
        self._queued_rows -= rows
        return batch

    async def _execute(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        if len(batch) == 1:
            feeds = batch[0].feeds
        else:
            feeds = {name: np.concatenate([item.feeds[name] for item in batch]) for name in batch[0].feeds}
        rows = sum(item.rows for item in batch)
        started = time.perf_counter()
        self._running += 1
        span = None
        if tracing._tracer and batch[0].span is not None:
            span = tracing.start_batch_span(self.name, [item.span for item in batch], rows)
        try:
            if span is None:
                outputs = await loop.run_in_executor(self._executor, self._run, feeds)
            else:
                outputs = await loop.run_in_executor(self._executor, tracing.traced_run, self._run, feeds, span)
        except Exception as exc:  # noqa: BLE001 - isolate the request that caused it
            failure: Exception | None = exc
        else:
            failure = None
        finally:
            self._running -= 1
            if span is not None:
                span.end()
        if failure is not None:
            if len(batch) == 1:
                _settle(batch[0], failure)
                return
            log.warning("%s: batch of %d requests failed (%s); running them one by one", self.name, len(batch),
                        failure)
            for item in batch:
                item.span = None  # its queue span ended with the failed batch
                await self._execute(loop, [item])
            return
        seconds = time.perf_counter() - started
        self._row_seconds = seconds / rows if not self._row_seconds else 0.8 * self._row_seconds + 0.2 * seconds / rows
        self._observer.ran(rows, seconds)
        start = 0
        for item in batch:
            end = start + item.rows
            _settle(item, {name: out[start:end] for name, out in outputs.items()})
            start = end


def _settle(item: _Pending, result: Tensors | BaseException) -> None:
    if item.future.done():  # the client went away
        return
    if isinstance(result, BaseException):
        item.future.set_exception(result)
    else:
        item.future.set_result(result)
