"""Health probes that never wait behind inference: ``/livez``, ``/readyz`` and ``/metrics`` on a
port of their own (``probe_port``), answered by a thread of each worker.

On the main port a probe shares the worker's event loop with every request in flight, and under
overload it waits its turn behind them (measured at 600 connections on /classify: /readyz p99
165 ms, and seconds once refusals flood the loop). Here a thread answers from state the event loop
publishes every ``beat_s``: whether the worker is ready (and why not) and when the loop last ran.
A loop that has not run for ``stalled_s`` makes the worker not live, so a wedged worker is still
caught (what a probe answered from a thread could otherwise hide).

Every worker binds the port with SO_REUSEPORT, like the gRPC port; the kernel spreads probes over
the workers."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("services.frontends.probes")


class ProbeState:
    """What the event loop publishes for the probe thread (plain attribute writes: atomic enough)."""

    def __init__(self, not_ready_reason: Callable[[], str | None], beat_s: float = 0.2, stalled_s: float = 30.0):
        self._not_ready_reason = not_ready_reason
        self.beat_s = beat_s
        self.stalled_s = stalled_s
        self.beat = time.monotonic()
        self.reason: str | None = "starting"
        self.stopping = False

    async def publish(self) -> None:
        while True:
            self.beat = time.monotonic()
            try:
                self.reason = self._not_ready_reason()
            except Exception as exc:  # noqa: BLE001 - a probe must answer whatever happens
                self.reason = f"readiness check failed: {type(exc).__name__}"
            await asyncio.sleep(self.beat_s)

    def live(self) -> tuple[bool, str]:
        age = time.monotonic() - self.beat
        if age > self.stalled_s:
            return False, f"the event loop has not run for {age:.0f} s"
        return True, "live"

    def ready(self) -> tuple[bool, str]:
        live, why = self.live()
        if not live:
            return False, why
        if self.stopping:
            return False, "shutting down"
        if self.reason is not None:
            return False, self.reason
        return True, "ready"


class ProbeServer:
    def __init__(self, state: ProbeState, port: int, host: str = "0.0.0.0",
                 metrics_page: Callable[[], tuple[bytes, str]] | None = None):
        self.state = state
        self.port = port
        self.host = host
        self.metrics_page = metrics_page
        self._server: ThreadingHTTPServer | None = None
        self._publisher: asyncio.Task | None = None

    def start(self) -> None:
        probes = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                if path in ("/livez", "/healthz", "/v2/health/live"):
                    ok, why = probes.state.live()
                    self._answer(200 if ok else 503, json.dumps({"live": ok, "reason": why}).encode(), "application/json")
                elif path in ("/readyz", "/v2/health/ready"):
                    ok, why = probes.state.ready()
                    self._answer(200 if ok else 503, json.dumps({"ready": ok, "reason": why}).encode(), "application/json")
                elif path == "/metrics" and probes.metrics_page is not None:
                    page, content_type = probes.metrics_page()
                    self._answer(200, page, content_type)
                else:
                    self._answer(404, b'{"error": "probes: /livez, /readyz, /metrics"}', "application/json")

            def _answer(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args) -> None:  # probes every few seconds: no log line each
                pass

        class Server(ThreadingHTTPServer):
            allow_reuse_port = True
            daemon_threads = True

        self._server = Server((self.host, self.port), Handler)
        threading.Thread(target=self._server.serve_forever, name="probes", daemon=True).start()
        self._publisher = asyncio.get_running_loop().create_task(self.state.publish())
        log.info("probes on %s:%d", self.host, self.port)

    def stop(self) -> None:
        if self._publisher is not None:
            self._publisher.cancel()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
