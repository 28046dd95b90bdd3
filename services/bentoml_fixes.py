"""A fix for the pinned BentoML (1.4.39), applied by the service in each worker; report upstream.

BentoML's ``TimeoutMiddleware`` schedules a ``loop.call_later(timeout, ...)`` per request and never
cancels it, so every request leaves a timer (and the future it holds) alive for the whole timeout:
at 3,000 requests/s and the 120 s timeout, 360,000 of them. Measured here: worker memory grew 9 MB
per 25,000 requests and p99 latency grew run after run (19 -> 108 ms) as the garbage collector's
full passes walked them. The replacement below is the same middleware with the timer cancelled
once the request is over.

It replaces a private method (``bentoml._internal.server.http.traffic.TimeoutMiddleware.__call__``),
so it is applied only to the code it was written against: BentoML ``PATCHED_VERSION`` whose
middleware source hashes to ``PATCHED_SOURCE_SHA256`` (else a warning, and BentoML's own). Any
upgrade fails tests/test_private_patches.py's guard until the patch is re-checked against the new
source (and dropped once upstream cancels the timer: that test then says so).

Upstream: no BentoML issue reports this (searched bentoml/BentoML in December 2026; the nearest,
#5642 on requests outliving ``traffic.timeout`` and #4760 on a 1.2 memory leak fixed in 2024, are
other bugs). The issue to file:

    TimeoutMiddleware never cancels its per-request timer. ``__call__`` runs
    ``loop.call_later(self.timeout, self._set_timer_out, waiter)`` and drops the handle, so every
    request, however fast, leaves a TimerHandle (and the waiter future it references) on the loop
    for the whole timeout: 360,000 live timers at 3,000 req/s with a 120 s timeout; worker memory
    grows and the garbage collector's full passes lengthen p99. Fix: keep the handle and
    ``cancel()`` it once the response has started and in a ``finally``."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging

log = logging.getLogger("services")
PATCHED_VERSION = "1.4.39"
# sha256 of ``inspect.getsource(TimeoutMiddleware)`` as BentoML PATCHED_VERSION ships it: the whole
# class (``__init__``, ``_set_timer_out``, ``__call__``), which the replacement below reproduces.
PATCHED_SOURCE_SHA256 = "4dab3e6bdd06efc590294d89beed9a399be6959b62bce9da024b33292e1be34b"


def timeout_middleware():
    """BentoML's private class the fix replaces a method of."""
    from bentoml._internal.server.http import traffic

    return traffic.TimeoutMiddleware


def original_call(middleware) -> object:
    """The middleware's own ``__call__``, whether or not the fix has replaced it."""
    return getattr(middleware.__call__, "_original", middleware.__call__)


def source_sha256(middleware) -> str:
    """The digest the fix was checked against, of the class as BentoML wrote it (with its own
    ``__call__`` even after the fix: ``inspect`` reads the file, not the patched class)."""
    return hashlib.sha256(inspect.getsource(middleware).encode()).hexdigest()


def cancel_request_timers() -> bool:
    import bentoml

    middleware = timeout_middleware()
    if bentoml.__version__ != PATCHED_VERSION or source_sha256(middleware) != PATCHED_SOURCE_SHA256:
        log.warning("BentoML %s's TimeoutMiddleware is not the code the timer fix was written for (BentoML %s); "
                    "not applied: see services/bentoml_fixes.py", bentoml.__version__, PATCHED_VERSION)
        return False
    if getattr(middleware.__call__, "_cancels_timer", False):
        return True

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse

        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

        async def _send(message) -> None:
            if not waiter.done():
                waiter.set_result(None)
            await send(message)

        fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)
        try:
            await waiter
        except asyncio.TimeoutError:
            if fut.cancel():
                await JSONResponse({"error": f"Not able to process the request in {self.timeout} seconds"},
                                   status_code=504)(scope, receive, send)
        else:
            timer.cancel()  # the response has started: the timer has nothing left to do
            await fut
        finally:
            timer.cancel()

    __call__._cancels_timer = True
    __call__._original = middleware.__call__
    middleware.__call__ = __call__
    return True
