"""Each worker's memory budget for requests in flight, and giving memory back after large ones.

Measured before this existed (issue 23, two workers, the standard models): one 2000x2000 /denoise
took a worker from 260 MB to 2.2 GB and kept it; eight palette PNGs declaring 4000x4000 took the
server to 7.5 GB. A pod limited to 1536 Mi is OOM-killed long before that. So every request that decodes
an image or runs a model first reserves what it will cost (known from the image header or the
declared tensor shapes, before any payload is decoded) from its worker's budget:

* cost = what the decode path holds per pixel (``DECODE_BYTES_PER_PIXEL``) + what the model's own
  graph holds per unit of input, measured at export by running it at two sizes and stored in the
  contract (``limits["peak_bytes_per_pixel"]`` or ``limits["peak_bytes_per_row"]``);
* a request that can never fit is refused with 413 naming its cost and the budget; one that does
  not fit now waits for memory (FIFO) up to ``memory_wait_ms``, then gets 503 + Retry-After;
* the budget is the worker's share of ``memory_fraction`` of the limit (``memory_limit`` or the
  cgroup's), minus what the worker holds once its models are loaded.

Memory is given back after a large request: glibc keeps freed heap memory for reuse, so buffers
above ``MMAP_THRESHOLD`` are put in their own mappings (returned to the kernel at once on free)
and ``malloc_trim`` runs shortly after every request that reserved more than ``TRIM_AFTER_BYTES``
(after, not at the end of the handler: its buffers are freed only once it has returned)."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import logging
import time
from collections import deque

from services.errors import too_large, unavailable

log = logging.getLogger("services.budget")
MIB = 1024 * 1024
# Bytes the image path holds per pixel of an upload at its peak, not counting the model's graph,
# with headroom over what `python -m services.bench_decode` measured here: an RGB PNG through the
# native-size path (decoded pixels, float planes in and out, the PNG answer) 38.0, grey 12.0; a
# model of fixed size (the picture shrunk right after decoding) 4.0 (RGB) and 8.0 (palette).
DECODE_BYTES_PER_PIXEL = 48
DECODE_BYTES_PER_PIXEL_SHRUNK = 12
# Above this a buffer gets its own mapping, returned to the kernel when freed. Not lower: with no
# ONNX Runtime arena, a 1 MiB threshold mapped and faulted in LeNet-5's activations on every
# batched run (measured: batches of 32 and 64 rows 1.7x slower; 8 MiB costs nothing).
MMAP_THRESHOLD = 8 * MIB
TRIM_AFTER_BYTES = 16 * MIB
# Long enough for the handler's frames and the answer's bytes to be freed, short next to the attack
# suite's 10 s recovery goal. Trims asked for meanwhile join the pending one.
TRIM_DELAY_S = 0.25


def model_cost(limits: dict, rows: int, pixels_per_row: int = 0) -> int:
    """What a model's graph holds for ``rows`` rows of ``pixels_per_row`` pixels (the contract's
    measured figure; 0 for a model exported before it was measured)."""
    if "peak_bytes_per_pixel" in limits and pixels_per_row:
        return int(limits["peak_bytes_per_pixel"] * rows * pixels_per_row)
    return int(limits.get("peak_bytes_per_row", 0) * rows)


class MemoryBudget:
    """Bytes reserved by the requests in flight in one worker (one event loop). ``capacity`` None
    means no limit is known: nothing is refused or waited for."""

    def __init__(self, capacity: int | None, wait_s: float = 10.0):
        self.capacity = capacity
        self.wait_s = wait_s
        self.used = 0
        self.peak = 0
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()

    def describe(self) -> str:
        return "no limit" if self.capacity is None else f"{self.capacity / MIB:.0f} MiB"

    def reserve(self, cost: int, what: str, field: str = "image") -> "Reservation | _Free":
        """``async with budget.reserve(...)`` holds ``cost`` bytes for the block; 413 when it can
        never fit, 503 after waiting. Free (no allocation at all) without a limit: the hot path."""
        if self.capacity is None or cost <= 0:
            return FREE
        return Reservation(self, cost, what, field)

    async def _wait(self, cost: int, what: str, field: str) -> None:
        future = asyncio.get_running_loop().create_future()
        entry = (cost, future)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(future), self.wait_s)
        except asyncio.TimeoutError:
            raise unavailable(field, f"{what} needs about {cost / MIB:.0f} MiB of memory and this worker's budget "
                                     f"({self.capacity / MIB:.0f} MiB) stayed in use for {self.wait_s:.0f} s; retry "
                                     f"later", retry_after=max(1.0, self.wait_s)) from None
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)
                self._wake()  # the next one may fit now that this one gave up

    def _wake(self) -> None:
        """First come, first served: the oldest waiter goes when it fits (no starving large ones)."""
        free = self.capacity - self.used
        for cost, future in list(self._waiters):
            if future.done():
                continue
            if cost > free:
                break
            future.set_result(None)
            free -= cost
            self._waiters.remove((cost, future))


class _Free:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc) -> None:
        return None


FREE = _Free()


class Reservation:
    __slots__ = ("budget", "cost", "what", "field")

    def __init__(self, budget: MemoryBudget, cost: int, what: str, field: str):
        self.budget, self.cost, self.what, self.field = budget, cost, what, field

    async def __aenter__(self) -> None:
        budget, cost = self.budget, self.cost
        if cost > budget.capacity:
            raise too_large(self.field, f"{self.what} needs about {cost / MIB:.0f} MiB of memory; this worker's "
                                        f"budget for requests is {budget.capacity / MIB:.0f} MiB")
        if budget._waiters or budget.used + cost > budget.capacity:
            await budget._wait(cost, self.what, self.field)
        budget.used += cost
        budget.peak = max(budget.peak, budget.used)

    async def __aexit__(self, *exc) -> None:
        self.budget.used -= self.cost
        self.budget._wake()
        if self.cost >= TRIM_AFTER_BYTES:
            give_back_memory_soon()


def worker_budget(limit: int | None, fraction: float, workers: int, resident: int) -> int | None:
    """One worker's share of ``fraction`` of the tree's limit, minus what it holds already."""
    if limit is None:
        return None
    share = int(limit * fraction / max(1, workers)) - resident
    if share < 32 * MIB:
        log.warning("memory: %d MiB limit x %.2f / %d workers leaves %d MiB for requests after the models (%d MiB); "
                    "large requests will be refused", limit // MIB, fraction, workers, share // MIB, resident // MIB)
    return max(share, 16 * MIB)


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def tune_allocator() -> bool:
    """Large buffers in their own mappings: returned to the kernel when freed instead of staying in
    the heap for reuse (glibc raises its threshold up to 32 MiB by itself after the first large
    free, which is how a worker kept gigabytes after one large image). One arena: ``malloc_trim``
    gives back the free top of the main arena only, and ONNX Runtime's runs in executor threads
    otherwise left their own arenas holding what they freed (measured: 12.7 MiB kept in one after a
    600x600 /denoise; the worker's Python holds the GIL, so one arena costs little). glibc only."""
    libc = _libc()
    if libc is None:
        return False
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    libc.mallopt(m_arena_max, 1)
    libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD)
    libc.mallopt(m_trim_threshold, 2 * MMAP_THRESHOLD)  # glibc's own ratio; malloc_trim does the rest
    return True


def give_back_memory() -> None:
    libc = _libc()
    if libc is not None:
        started = time.perf_counter()
        libc.malloc_trim(0)
        log.debug("malloc_trim took %.1f ms", (time.perf_counter() - started) * 1000)


_trims_pending: set[int] = set()  # id() of the event loops with a trim scheduled


def give_back_memory_soon() -> None:
    """``malloc_trim`` TRIM_DELAY_S from now, off the event loop. Called from inside a handler,
    trimming at once would run before the handler's own arrays (and a gRPC message's bytes) are
    freed, and glibc would keep those pages: measured as a /denoise of 1200x1200 leaving the tree
    more than 10 % above rest 10 s later with an 8 MiB mmap threshold."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        give_back_memory()
        return
    key = id(loop)
    if key in _trims_pending:
        return
    _trims_pending.add(key)

    def trim() -> None:
        _trims_pending.discard(key)
        loop.run_in_executor(None, give_back_memory)

    loop.call_later(TRIM_DELAY_S, trim)
