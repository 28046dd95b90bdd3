"""Health probes that never wait behind inference: ``/livez``, ``/readyz`` and ``/metrics`` on a
port of their own (``probe_port``), answered by a thread of each worker.

On the main port a probe shares the worker's event loop with every request in flight, and under
overload it waits its turn behind them (measured at 600 connections on /classify: /readyz p99
165 ms, and seconds once refusals flood the loop). Here a thread answers from state the event loop
publishes every ``beat_s``: whether the worker is ready (and why not) and when the loop last ran.
A loop that has not run for ``stalled_s`` makes the worker not live, so a wedged worker is still
caught (what a probe answered from a thread could otherwise hide).

That thread runs an asyncio server on an event loop of its own, not a thread per connection: with
``ThreadingHTTPServer``, 3,000 half-open connections on the probe port made 3,000 threads and
delayed /v2/health/live by 5.4 s and /readyz by 4.1 s, with failed probes. Now a connection costs
a few objects, at most ``max_connections`` are open (a new one closes the oldest, so whoever holds
connections cannot lock out the kubelet, whose probes open fresh ones), and one that has not sent
its request line and headers within ``header_timeout_s`` is closed.

Every worker binds the port with SO_REUSEPORT, like the gRPC port; the kernel spreads probes over
the workers."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from http import HTTPStatus

log = logging.getLogger("services.frontends.probes")

MAX_HEAD = 8192  # request line + headers; more is answered 431
MAX_BODY = 65536  # a body sent to these GET routes is read and dropped up to this; more is answered 413


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


class _Refused(Exception):
    """A request answered with an error, after which the connection is closed."""

    def __init__(self, status: int, error: str):
        super().__init__(error)
        self.status = status
        self.body = json.dumps({"error": error}).encode()


class ProbeServer:
    def __init__(self, state: ProbeState, port: int, host: str = "0.0.0.0",
                 metrics_page: Callable[[], tuple[bytes, str]] | None = None,
                 max_connections: int = 512, header_timeout_s: float = 2.0):
        self.state = state
        self.port = port
        self.host = host
        self.metrics_page = metrics_page
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self._publisher: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the probe thread's own loop
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None
        self._open: dict[asyncio.StreamWriter, None] = {}  # open connections, oldest first (probe loop only)

    def start(self) -> None:
        """Bind the port and start the probe thread; called on the worker's running event loop."""
        worker_loop = asyncio.get_running_loop()
        sock = self._listen()  # here, so that a port that cannot be bound fails the start-up
        self._loop = asyncio.SelectorEventLoop()
        self._stopped = asyncio.Event()
        self._thread = threading.Thread(target=self._run, args=(self._loop, sock), name="probes", daemon=True)
        self._thread.start()
        self._publisher = worker_loop.create_task(self.state.publish())
        log.info("probes on %s:%d", self.host, self.port)

    def stop(self) -> None:
        """Cancel the publisher; close the server and its connections, and end the probe thread."""
        if self._publisher is not None:
            self._publisher.cancel()
            self._publisher = None
        loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._stopped.set)
        except RuntimeError:  # the loop is already closed: the thread has ended
            return
        thread.join(timeout=5.0)
        if thread.is_alive():
            log.warning("the probe thread did not stop within 5 s")

    def _listen(self) -> socket.socket:
        family, kind, proto, _, address = socket.getaddrinfo(self.host or None, self.port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # every worker binds this port
            sock.bind(address)
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        return sock

    def _run(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        try:
            loop.run_until_complete(self._serve(sock))
        except Exception:  # noqa: BLE001 - logged: the thread has nobody to report to
            log.exception("the probe server failed")
        finally:
            sock.close()
            loop.close()

    async def _serve(self, sock: socket.socket) -> None:
        server = await asyncio.start_server(self._connection, sock=sock, limit=MAX_HEAD)
        try:
            await self._stopped.wait()
        finally:
            server.close()
            for writer in list(self._open):
                writer.transport.abort()
            handlers = asyncio.all_tasks() - {asyncio.current_task()}
            for task in handlers:
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._open) >= self.max_connections:
            # Close the oldest, not this one: whoever holds connections must not lock out the
            # kubelet, whose probes open fresh ones.
            oldest = next(iter(self._open))
            del self._open[oldest]
            oldest.transport.abort()
        self._open[writer] = None
        # drain() then waits until an answer has reached the kernel: what is still buffered when
        # the connection ends belongs to a client that does not read, and is dropped.
        writer.transport.set_write_buffer_limits(high=0)
        try:
            while await self._exchange(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away
        except Exception:  # noqa: BLE001 - one connection's failure must not end the server
            log.exception("probe connection failed")
        finally:
            self._open.pop(writer, None)
            if writer.transport.get_write_buffer_size():
                writer.transport.abort()
            else:
                writer.close()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Read one request and answer it; False when the connection is to be closed."""
        try:
            method, path, close, length = await self._read_head(reader)
            if length:  # a body on a GET route: read and dropped, within the same time
                try:
                    async with asyncio.timeout(self.header_timeout_s):
                        await reader.readexactly(length)
                except TimeoutError:
                    raise _Refused(408, f"request body not received within {self.header_timeout_s:g} s") from None
        except _Refused as refused:
            await self._answer(writer, refused.status, refused.body, "application/json", False, True)
            return False
        if method in ("GET", "HEAD"):
            status, body, content_type = self.do_GET(path)
        else:
            status, body, content_type = 405, b'{"error": "probes answer GET and HEAD"}', "application/json"
        await self._answer(writer, status, body, content_type, method == "HEAD", close)
        return not close

    async def _read_head(self, reader: asyncio.StreamReader) -> tuple[str, str, bool, int]:
        """The method, path, whether to close after the answer, and the body's length."""
        try:
            async with asyncio.timeout(self.header_timeout_s):
                head = await reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            raise _Refused(408, f"request headers not received within {self.header_timeout_s:g} s") from None
        except asyncio.LimitOverrunError:
            raise _Refused(431, f"request line and headers over {MAX_HEAD} bytes") from None
        request_line, *lines = head.decode("latin-1").lstrip("\r\n").split("\r\n")
        parts = request_line.split(" ")
        if len(parts) != 3 or parts[2] not in ("HTTP/1.0", "HTTP/1.1"):
            raise _Refused(400, "malformed request line")
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in filter(None, lines):
            name, colon, value = line.partition(":")
            if not colon:
                raise _Refused(400, "malformed header")
            headers[name.strip().lower()] = value.strip()
        if "transfer-encoding" in headers:
            raise _Refused(411, "probes read request bodies by Content-Length only")
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            raise _Refused(400, "malformed Content-Length") from None
        if length < 0:
            raise _Refused(400, "malformed Content-Length")
        if length > MAX_BODY:
            raise _Refused(413, f"request body over {MAX_BODY} bytes")
        connection = {token.strip().lower() for token in headers.get("connection", "").split(",")}
        close = version == "HTTP/1.0" or "close" in connection
        return method, target.split("?", 1)[0], close, length

    # Named as http.server's handler method, and followed by _answer: tests/test_deploy_manifests.py
    # reads the probe paths from the source between the two.
    def do_GET(self, path: str) -> tuple[int, bytes, str]:  # noqa: N802
        if path in ("/livez", "/healthz", "/v2/health/live"):
            ok, why = self.state.live()
            return 200 if ok else 503, json.dumps({"live": ok, "reason": why}).encode(), "application/json"
        if path in ("/readyz", "/v2/health/ready"):
            ok, why = self.state.ready()
            return 200 if ok else 503, json.dumps({"ready": ok, "reason": why}).encode(), "application/json"
        if path == "/metrics" and self.metrics_page is not None:
            page, content_type = self.metrics_page()
            return 200, page, content_type
        return 404, b'{"error": "probes: /livez, /readyz, /metrics"}', "application/json"

    async def _answer(self, writer: asyncio.StreamWriter, status: int, body: bytes, content_type: str,
                      head_only: bool, close: bool) -> None:
        lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", f"Content-Type: {content_type}",
                 f"Content-Length: {len(body)}"]
        if status == 405:
            lines.append("Allow: GET, HEAD")
        if close:
            lines.append("Connection: close")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body))
        await writer.drain()
