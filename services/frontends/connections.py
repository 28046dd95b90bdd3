"""A header and body read timeout and a connection cap for uvicorn's HTTP protocols, in each worker.

uvicorn (which BentoML starts, so we cannot pass it options) has neither: a connection that never
finishes its request is held until the client gives up, and every one of them costs a worker's
event loop and the shared listening socket's backlog (2,048). Measured here: 2,100 half-open
connections on port 3000 delayed the probes there by seconds.

``install_http_guard`` wraps methods of a dependency's classes,
``uvicorn.protocols.http.httptools_impl.HttpToolsProtocol`` and, when importable,
``uvicorn.protocols.http.h11_impl.H11Protocol`` (it calls the originals; no uvicorn code is copied).
Written against uvicorn 0.55.0 (``WRITTEN_FOR``), whose classes it wraps and reads hash to
``WRITTEN_FOR_SHA256``: tests/test_private_patches.py fails on any uvicorn that differs, until the
guard is re-checked; tests/test_connection_guards.py fails when an upgrade breaks its behaviour;
and the function returns False with a warning when the methods it wraps are gone.

- ``connection_made``: a connection beyond ``max_connections`` open ones (uvicorn's server-wide
  ``connections`` set, which already holds the new one) is answered 503 and closed at once.
- Each connection carries a deadline: for its request headers from the connection, then from the
  first byte of each later request (the idle time between requests is uvicorn's own keep-alive
  timeout), and for its body from the end of its headers. A deadline still running is not moved:
  a client trickling bytes must not reset it. Past it the request gets 408 and the connection is
  closed (or, while an answer is being written, closed once it is complete).
- Deadlines are plain attributes, checked by one sweep per worker a few times per timeout, not
  timers per request: on /classify's hot path per-request timers cost measurable throughput.
- httptools: set in ``connection_made`` / ``on_message_begin`` (headers), ``on_headers_complete``
  (body), cleared in ``on_message_complete``. h11 has no per-message parser callback, so
  ``data_received`` is wrapped: after uvicorn handled the data, the peer's state says which
  deadline applies (``IDLE``: headers, ``SEND_BODY``: body, else none).
"""

from __future__ import annotations

import json
import logging

log = logging.getLogger("services.frontends")

WRITTEN_FOR = "0.55.0"
# sha256 of ``inspect.getsource`` of each uvicorn class the guard wraps methods of or reads
# attributes of (the protocol's server_state, connections, transport, cycle, conn; the cycle's
# response_started, response_complete, disconnected, message_event), as uvicorn WRITTEN_FOR ships them.
WRITTEN_FOR_SHA256 = {
    "uvicorn.protocols.http.httptools_impl.HttpToolsProtocol":
        "ec7f438cf5cec43e89f2636c4521d2937acfcbd11db4cfdc627dad3b9962ff3f",
    "uvicorn.protocols.http.httptools_impl.RequestResponseCycle":
        "e67d470d435dcc1ce6de9773841524a4439a06afd3a7243e458dc7f7c952b310",
    "uvicorn.protocols.http.h11_impl.H11Protocol": "57050e6aae208cc3a32f4be8568c095e1785091ffef683112c93cd6cd5c9ddf9",
    "uvicorn.protocols.http.h11_impl.RequestResponseCycle":
        "b9327fce724d5252bef98a45c951028934874da2fd45e4018760a52ce37490be",
}
_DEADLINE = "_services_deadline"  # the instance attribute: (what is awaited, loop time it is due by) or None
_MARK = "_services_http_guard"  # set on each wrapper: makes a second install a no-op
_limits = {"max_connections": 1024, "header_timeout_s": 10.0, "body_timeout_s": 30.0}
_installed = False
_SWEPT = "_services_swept"  # set on uvicorn's per-server state once its sweep runs


def guard_installed() -> bool:
    return _installed


def _refuse(transport, status: bytes, error: str) -> None:
    body = json.dumps({"error": error}).encode()
    transport.write(b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\nconnection: close\r\n"
                    b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    transport.close()


def _await(protocol, what: str, move: bool = False) -> None:
    """From now on the connection awaits ``what`` (headers or body); a running deadline for the
    same thing is kept unless ``move``."""
    current = getattr(protocol, _DEADLINE, None)
    if current is not None and current[0] == what and not move:
        return
    setattr(protocol, _DEADLINE, (what, protocol.loop.time() + _limits[f"{what}_timeout_s"]))


def _done(protocol) -> None:
    setattr(protocol, _DEADLINE, None)


def _sweep_interval() -> float:
    return min(1.0, _limits["header_timeout_s"] / 4, _limits["body_timeout_s"] / 4)


def _watch(protocol) -> None:
    """One sweep per uvicorn server (one per worker), started with its first connection."""
    state = protocol.server_state
    if not getattr(state, _SWEPT, False):
        setattr(state, _SWEPT, True)
        protocol.loop.call_later(_sweep_interval(), _sweep, protocol.loop, protocol.connections)


def _sweep(loop, connections) -> None:
    now = loop.time()
    for protocol in list(connections):
        deadline = getattr(protocol, _DEADLINE, None)
        if deadline is not None and now > deadline[1]:
            _expired(protocol, deadline[0])
    loop.call_later(_sweep_interval(), _sweep, loop, connections)


def _expired(protocol, what: str) -> None:
    _done(protocol)
    transport = protocol.transport
    if transport is None or transport.is_closing():
        return
    cycle = getattr(protocol, "cycle", None)
    if cycle is not None and getattr(cycle, "response_started", False) and not cycle.response_complete:
        # A pipelined request is slow while an answer is being written: no 408 into the middle of
        # it; uvicorn's own shutdown closes the connection once that answer is complete.
        protocol.shutdown()
        return
    if cycle is not None and not cycle.response_complete:
        cycle.disconnected = True  # the application reading the body is told the client is gone
        message_event = getattr(cycle, "message_event", None)
        if message_event is not None:
            message_event.set()
    timeout = _limits[f"{what}_timeout_s"]
    _refuse(transport, b"408 Request Timeout",
            f"request {'headers' if what == 'header' else what} not received within {timeout:g} s")


def _wrap(cls, name: str, make):
    original = getattr(cls, name)
    if getattr(original, _MARK, False):
        return
    wrapper = make(original)
    wrapper.__name__, wrapper.__qualname__, wrapper.__doc__ = original.__name__, original.__qualname__, original.__doc__
    setattr(wrapper, _MARK, True)
    setattr(cls, name, wrapper)


def _connection_made(original):
    def connection_made(self, transport) -> None:
        original(self, transport)
        limit = _limits["max_connections"]
        if len(self.connections) > limit:
            _refuse(transport, b"503 Service Unavailable",
                    f"server: too many open connections (limit {limit}); retry later")
        else:
            _await(self, "header")
            _watch(self)
    return connection_made


def _connection_lost(original):
    def connection_lost(self, exc) -> None:
        _done(self)
        original(self, exc)
    return connection_lost


def _before(action):
    """A wrapper that does ``action(self)`` and then calls the original with its arguments."""
    def make(original):
        def wrapper(self, *args):
            action(self)
            return original(self, *args)
        return wrapper
    return make


def _h11_data_received(original):
    import h11

    def data_received(self, data: bytes) -> None:
        original(self, data)
        state = self.conn.their_state
        if self.transport.is_closing():
            _done(self)
        elif state is h11.IDLE:
            _await(self, "header")  # a request has begun and its headers are not complete yet
        elif state is h11.SEND_BODY:
            _await(self, "body")
        else:
            _done(self)
    return data_received


def _targets() -> list[tuple[type, dict]] | None:
    """The classes to patch with their wrappers, or None if uvicorn no longer has what we wrap."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError as exc:
        log.warning("HTTP guard not installed: uvicorn's httptools protocol is not importable (%s)", exc)
        return None
    common = {"connection_made": _connection_made, "connection_lost": _connection_lost}
    targets = [(HttpToolsProtocol, {**common, "on_message_begin": _before(lambda p: _await(p, "header")),
                                    "on_headers_complete": _before(lambda p: _await(p, "body")),
                                    "on_message_complete": _before(_done)})]
    try:
        import h11
        from uvicorn.protocols.http.h11_impl import H11Protocol
    except ImportError:
        pass  # h11 not installed: nothing to guard there
    else:
        if hasattr(h11, "IDLE"):
            targets.append((H11Protocol, {**common, "data_received": _h11_data_received}))
        else:
            log.warning("HTTP guard not installed: h11 %s has no IDLE state", getattr(h11, "__version__", "?"))
            return None
    for cls, wrappers in targets:
        missing = [name for name in [*wrappers, "shutdown"] if not callable(getattr(cls, name, None))]
        if not missing and "server_state" not in cls.__init__.__code__.co_varnames:
            missing = ["server_state"]
        if missing:
            log.warning("HTTP guard not installed: uvicorn %s's %s has no %s (written for uvicorn %s)",
                        _uvicorn_version(), cls.__name__, ", ".join(missing), WRITTEN_FOR)
            return None
    return targets


def _uvicorn_version() -> str:
    import uvicorn

    return getattr(uvicorn, "__version__", "?")


def install_http_guard(max_connections: int, header_timeout_s: float, body_timeout_s: float = 30.0) -> bool:
    """Guard uvicorn's HTTP connections (see the module docstring); True when installed.

    Call it before uvicorn accepts connections; calling it again only updates the limits."""
    global _installed
    if max_connections < 1 or header_timeout_s <= 0 or body_timeout_s <= 0:
        raise ValueError(f"max_connections {max_connections}, header_timeout_s {header_timeout_s} and "
                         f"body_timeout_s {body_timeout_s} must be > 0")
    _limits.update(max_connections=int(max_connections), header_timeout_s=float(header_timeout_s),
                   body_timeout_s=float(body_timeout_s))
    if _installed:
        return True
    targets = _targets()
    if targets is None:
        return False
    if _uvicorn_version() != WRITTEN_FOR:
        log.info("HTTP guard written for uvicorn %s, running on %s", WRITTEN_FOR, _uvicorn_version())
    for cls, wrappers in targets:
        for name, make in wrappers.items():
            _wrap(cls, name, make)
    _installed = True
    log.info("HTTP guard: at most %d connections per worker, request headers within %g s, bodies within %g s",
             max_connections, header_timeout_s, body_timeout_s)
    return True
