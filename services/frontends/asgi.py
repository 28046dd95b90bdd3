"""The small ASGI layer under the HTTP front-ends: a request with a bounded body, endpoints that
turn ``ServingError`` into ``{"error", "field"}`` JSON (and anything else into a 500 without a
stack trace), per-model request metrics, and an app that BentoML mounts at ``/``.

Why not Starlette's request/response machinery or BentoML's ``@bentoml.api``: on this hot path
their per-request work (form parsing into temporary files, schema work, middleware layers) cost
more CPU than the model. The app still is a Starlette instance so that BentoML's mount asks its
routes before claiming a path (its own /livez, /readyz, /metrics and UI stay BentoML's)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import random
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.routing import Match, Route

from services.config import ServingConfig
from services.errors import ServingError, bad_request, too_large, unauthorized, unavailable
from services import tracing
from services.rollout import ROLLOUT_HEADER, requested_arm

if TYPE_CHECKING:  # the data plane sits below the front-ends; imported for types only
    from services.dataplane import DataPlane
    from services.metrics import ServingMetrics

log = logging.getLogger("services.frontends")
JSON = b"application/json"


def route_path(scope: dict) -> str:
    """The request's path below the app's mount point: ``path`` less a ``root_path`` prefix that
    ends at a path segment. Starlette's own rule (1.x ``get_route_path``, private to it), restated
    here rather than imported: "/api/classify" under "/api" -> "/classify", "/api" -> "",
    "/apiary" under "/api" or "/x" under "/api" -> unchanged."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if not root or not path.startswith(root):
        return path
    if path == root:
        return ""
    return path[len(root):] if path[len(root)] == "/" else path


def parse_json(body: bytes | memoryview, field: str = "body") -> Any:
    """JSON with its hostile cases as 400s naming them: nesting deeper than the parser's recursion
    allows, integers longer than Python converts (4,300 digits), NaN/Infinity (not JSON)."""
    try:
        if not isinstance(body, str):  # as json.loads decodes bytes
            raw = body if isinstance(body, bytes) else bytes(body)
            body = raw.decode(json.detect_encoding(raw), "surrogatepass")
        return _DECODER.decode(body)
    except RecursionError:
        raise bad_request(field, "JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, and the integer digit limit
        raise bad_request(field, f"not valid JSON: {str(exc)[:200]}") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


_DECODER = json.JSONDecoder(parse_constant=_no_constant)  # one, not one per call as json.loads(..., parse_constant=)


class Request:
    __slots__ = ("scope", "_receive", "max_body_bytes", "_headers", "_query", "_body", "body_read")

    def __init__(self, scope: dict, receive: Callable[[], Awaitable[dict]], max_body_bytes: int):
        self.scope = scope
        self._receive = receive
        self.max_body_bytes = max_body_bytes
        self._headers: dict[str, str] | None = None
        self._query: dict[str, str] | None = None
        self._body: bytes | None = None
        self.body_read: asyncio.Event | None = None  # set once the body is in (requests watched for a disconnect)

    @property
    def method(self) -> str:
        return self.scope["method"]

    @property
    def path_params(self) -> dict[str, str]:
        return self.scope.get("path_params", {})

    @property
    def headers(self) -> dict[str, str]:
        if self._headers is None:
            self._headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in self.scope["headers"]}
        return self._headers

    @property
    def query(self) -> dict[str, str]:
        if self._query is None:
            self._query = dict(parse_qsl(self.scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))
        return self._query

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")

    @property
    def media_type(self) -> str:
        """The content type without parameters, lower case ("" when absent)."""
        return self.content_type.split(";", 1)[0].strip().lower()

    async def body(self) -> bytes:
        """The whole body; refused with 413 before reading when its declared length is over the
        limit, and as soon as the bytes read pass it (chunked uploads)."""
        if self._body is not None:
            return self._body
        declared = self.headers.get("content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                raise bad_request("content-length", f"not an integer: {declared!r}") from None
            if length > self.max_body_bytes:
                raise too_large("body", f"{length} bytes; the limit is {self.max_body_bytes}")
        chunks, size = [], 0
        # A client trickling its body is cut off by the connection guard's body timeout
        # (services/frontends/connections.py), not a timer here: that one costs nothing per request.
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > self.max_body_bytes:
                    raise too_large("body", f"more than {self.max_body_bytes} bytes; the limit is {self.max_body_bytes}")
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        self._body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if self.body_read is not None:
            self.body_read.set()
        return self._body

    async def json(self) -> Any:
        body = await self.body()
        if not body.strip():
            return {}
        return parse_json(body)

    async def disconnected(self) -> None:
        """Returns when the client goes away; only once the body is read (before that, receiving
        would take the body's own messages)."""
        await self.body_read.wait()
        while (await self._receive())["type"] != "http.disconnect":
            pass


class ClientGone(Exception):
    """The client disconnected before the request was read; nothing to answer."""


class Response:
    __slots__ = ("status", "body", "headers")

    def __init__(self, body: bytes, status: int = 200, content_type: bytes = JSON,
                 headers: list[tuple[bytes, bytes]] | None = None):
        self.status = status
        self.body = body
        self.headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                        *(headers or ())]

    async def send(self, send, receive=None) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})


class StreamingResponse:
    """Chunks from an async iterator of bytes (server-sent events). When the client disconnects the
    iteration is stopped and the iterator closed, so whatever produces the chunks (a generation in
    the text engine) stops too: servers accept writes to a closed connection silently."""

    def __init__(self, chunks, content_type: bytes, status: int = 200, headers: list[tuple[bytes, bytes]] | None = None):
        self.status = status
        self.chunks = chunks
        self.headers = [(b"content-type", content_type), *(headers or ())]

    async def send(self, send, receive=None) -> None:
        streaming = asyncio.current_task()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            streaming.cancel()

        watcher = asyncio.ensure_future(watch()) if receive is not None else None
        try:
            await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        except asyncio.CancelledError:
            if watcher is None or not watcher.done():
                raise
            streaming.uncancel()  # the client left; nothing more to send
        finally:
            if watcher is not None:
                watcher.cancel()
            close = getattr(self.chunks, "aclose", None)
            if close is not None:
                await close()


def json_response(payload: Any, status: int = 200, headers: list[tuple[bytes, bytes]] | None = None) -> Response:
    return Response(json.dumps(payload).encode(), status, JSON, headers)


def error_response(exc: ServingError, body: Callable[[ServingError], Any] | None = None) -> Response:
    """``body`` shapes the JSON (a protocol's own error object); ours by default."""
    headers = [(b"retry-after", str(max(1, round(exc.retry_after))).encode())] if exc.retry_after else []
    if exc.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    return json_response(body(exc) if body is not None else exc.to_json(), exc.status, headers)


Handler = Callable[[Request], Awaitable[Any]]


def require_bearer(request: Request, key: bytes, missing: str, what: str) -> None:
    """``Authorization: Bearer <key>``, compared in constant time; 401 naming ``what`` otherwise."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise unauthorized(f"missing: {missing} as 'Authorization: Bearer <key>'")
    if not hmac.compare_digest(token.strip().encode(), key):
        raise unauthorized(f"the {what} is not valid")


class Endpoint:
    """One route's ASGI app: method check, the handler, error mapping, request metrics. ``model``
    names the model for metrics (a path parameter name prefixed with ':' or a fixed name)."""

    def __init__(self, frontend: "HttpFrontend", handler: Handler, methods: tuple[str, ...], protocol: str,
                 model: str | None, errors: Callable[[ServingError], Any] | None = None, public: bool = False,
                 admits: bool = False, body: str = "json", control: bool = False,
                 cancel_on_disconnect: bool | Callable[[Any, str | None], bool] = False, task: str | None = None):
        self.frontend = frontend
        self.task = task  # the task an image route serves: its upload limit is its models' largest
        self.public = public  # answered without the API key (health, metrics)
        self.admits = admits  # runs the model: refused at once, body unread, while the model cannot take more
        self.body = body  # what the body holds, for its limit: json, image (the task's), tensors (the model's), none
        # json and none limits are the settings'; the others depend on the model, known per request
        self.fixed_body_limit = frontend.body_limit(body, None, None) if body in ("json", "none") else None
        self.control = control  # model control: off unless enabled, then the admin key instead of the API key
        # A non-streamed generation stops when its client leaves. Watching costs two tasks per request,
        # so a route serving fast models too passes a predicate of (plane, model) instead of True.
        self.cancel_on_disconnect = cancel_on_disconnect
        self.handler = handler
        self.methods = methods
        self.protocol = protocol
        self.model = model
        self.errors = errors
        self.path = ""  # its route's path template (the request span's name), set by HttpFrontend.route

    async def __call__(self, scope, receive, send) -> None:
        if tracing._tracer is None:
            await self._serve(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        with tracing.request_span(f"{scope['method']} {self.path}", headers,
                                  {"http.request.method": scope["method"], "http.route": self.path,
                                   "protocol": self.protocol}) as span:
            status = await self._serve(scope, receive, send)
            span.set_attribute("http.response.status_code", status)
            model = self._model_label(scope)
            if model:
                span.set_attribute("model", model)

    async def _serve(self, scope, receive, send) -> int:
        """-> the status answered (499: the client left first)."""
        started = time.perf_counter()
        frontend = self.frontend
        request = Request(scope, receive, frontend.max_body_bytes)
        try:
            if frontend.plane is None:
                raise unavailable("server", "starting: models are not loaded yet", retry_after=1)
            if self.control:
                frontend.authorize_control(request)
            elif frontend.api_key and not self.public:
                frontend.authorize(request)
            if scope["method"] not in self.methods:
                response = error_response(ServingError(None, f"method {scope['method']} not allowed; use "
                                                             f"{' or '.join(self.methods)}", 405), self.errors)
                response.headers.append((b"allow", ", ".join(self.methods).encode()))
            else:
                # Everything that can refuse the request without its body does so before it is read.
                request.max_body_bytes = self.fixed_body_limit or frontend.body_limit(self.body, self._model_label(scope),
                                                                                      request, self.task)
                if frontend.plane.rollouts.plans:  # a request may pin itself to a rollout's arm
                    requested_arm.set(request.headers.get(ROLLOUT_HEADER))
                if self.admits:
                    refusal = frontend.plane.admission_error(self._model_label(scope))
                    if refusal is not None:
                        raise refusal
                watch = self.cancel_on_disconnect
                if watch is True or (watch and watch(frontend.plane, self._model_label(scope))):
                    response = await self._unless_disconnected(request)
                else:
                    response = await self.handler(request)
        except ServingError as exc:
            response = error_response(exc, self.errors)
        except ClientGone:
            return 499
        except Exception:  # a JSON body clients can parse, and no stack trace in it
            log.exception("%s %s failed", scope["method"], scope["path"])
            response = error_response(ServingError(None, "internal error; the server log has the details", 500),
                                      self.errors)
        self.frontend.count(self._model_label(scope), self.protocol, response.status, time.perf_counter() - started)
        close = self.frontend.stream_close_probability if isinstance(response, StreamingResponse) else \
            self.frontend.close_probability
        if close and random.random() < close:
            response.headers.append((b"connection", b"close"))
        await response.send(send, receive)
        return response.status

    async def _unless_disconnected(self, request: Request) -> Any:
        """The handler, cancelled when the client disconnects (a generation nobody will read)."""
        request.body_read = asyncio.Event()
        work = asyncio.ensure_future(self.handler(request))
        watch = asyncio.ensure_future(request.disconnected())
        try:
            await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if not work.done():
            work.cancel()
            raise ClientGone()
        return work.result()

    def _model_label(self, scope) -> str | None:
        if "suite.model" in scope:  # set by handlers that read the model from the body
            return scope["suite.model"]
        if self.model and self.model.startswith(":"):
            return scope.get("path_params", {}).get(self.model[1:])
        return self.model


class ExactRoute(Route):
    """A route without path parameters, matched by string comparison instead of a regular expression
    (BentoML's mount and the router each ask every route on every request)."""

    def matches(self, scope) -> tuple[Match, dict]:
        if scope["type"] == "http" and route_path(scope) == self.path:
            return Match.FULL, {"endpoint": self.endpoint, "path_params": {}}
        return Match.NONE, {}


class HttpFrontend(Starlette):
    """Routes of one or more HTTP front-ends over a data plane that is bound once the serving process
    has built it (``bind``); until then every route answers 503."""

    def __init__(self, config: ServingConfig | None = None):
        super().__init__()
        self.config = config or ServingConfig()
        self.plane: DataPlane | None = None
        self.metrics: ServingMetrics | None = None
        self.max_body_bytes = self.config.max_body_bytes
        self.close_probability = 0.0
        self.stream_close_probability = 0.0
        self.api_key = b""
        self._exact: dict[str, Endpoint] = {}

    def bind(self, plane: "DataPlane", metrics: "ServingMetrics | None" = None) -> None:
        """The settings' ``keepalive_requests``: close a keep-alive connection after that many
        requests on average (at random, so no per-connection state), which lets the kernel hand the
        reconnection to whichever worker is least busy; 0 keeps connections open.
        ``keepalive_streams``: the same for streamed responses, which are long enough that
        rebalancing sooner costs nothing."""
        self.plane, self.metrics = plane, metrics
        requests, streams = self.config.keepalive_requests, self.config.keepalive_streams
        self.close_probability = 1 / requests if requests else 0.0
        self.stream_close_probability = 1 / streams if streams else 0.0
        self.api_key = self.config.api_key.encode()

    def authorize(self, request: Request) -> None:
        """``Authorization: Bearer <api_key>``, compared in constant time; 401 otherwise."""
        require_bearer(request, self.api_key, "send the API key", "API key")

    def authorize_control(self, request: Request) -> None:
        """Model control: 403 unless enabled (``model_control=explicit``), then the admin key (never
        the inference key), and a JSON content type on every POST, so that no HTML form of another
        site can send one (a cross-site form cannot set application/json without a preflight)."""
        if self.config.model_control != "explicit":
            raise ServingError("model_control", "model control is off on this server (model_control=none); "
                                                "start it with model_control=explicit and an admin_key", 403)
        require_bearer(request, self.config.admin_key.encode(), "model control needs the admin key", "admin key")
        if request.method == "POST" and request.media_type != "application/json":
            raise ServingError("content-type", f"model control takes application/json, got "
                                               f"{request.media_type or 'no content type'}", 415)

    def body_limit(self, kind: str, model: str | None, request: Request | None, task: str | None = None) -> int:
        """The body limit of one request, known before its body is read: each is far below the
        global ceiling (``max_body_bytes``) that used to apply to every route."""
        ceiling = self.config.max_body_bytes
        if kind == "json":
            return min(ceiling, self.config.max_json_bytes)
        if kind == "none":
            return min(ceiling, 64 * 1024)
        if kind == "image":  # the largest upload the route's models accept: 4 bytes a pixel (RGBA) and headroom
            return min(ceiling, self.plane.image_body_limit(task) + 1024 * 1024)
        if kind == "tensors":  # the model's largest tensors, binary or as JSON numbers
            binary = request.headers.get("inference-header-content-length") is not None
            return min(ceiling, self.plane.tensor_body_limit(model, binary, self.config.max_json_bytes))
        raise ValueError(kind)

    def route(self, path: str, handler: Handler, methods: tuple[str, ...] = ("POST",), protocol: str = "native",
              model: str | None = None, errors: Callable[[ServingError], Any] | None = None,
              public: bool = False, admits: bool = False, body: str = "json", control: bool = False,
              cancel_on_disconnect: bool | Callable[[Any, str | None], bool] = False, task: str | None = None) -> None:
        """``admits``: the route runs ``model``, so admission control may refuse it before its body is
        read. ``body``: what its body holds (json, image, tensors, none), which sets its limit."""
        endpoint = Endpoint(self, handler, methods, protocol, model, errors, public, admits, body, control,
                            cancel_on_disconnect, task)
        endpoint.path = path
        if "{" in path:
            self.router.routes.append(Route(path, endpoint))
        else:
            self.router.routes.append(ExactRoute(path, endpoint))
            self._exact[path] = endpoint

    def count(self, model: str | None, protocol: str, status: int, seconds: float) -> None:
        if self.metrics is not None and model:
            self.metrics.request(model, protocol, status, seconds)

    async def __call__(self, scope, receive, send) -> None:
        # Straight to the endpoint (or the router for paths with parameters): endpoints handle their
        # own errors, so Starlette's error and exception middleware layers would only add work.
        endpoint = self._exact.get(route_path(scope)) if scope["type"] == "http" else None
        if endpoint is not None:
            await endpoint(scope, receive, send)
        else:
            await self.router(scope, receive, send)
