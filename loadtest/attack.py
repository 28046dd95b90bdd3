"""Attack suite: every class of hostile or oversized input against a real ``bentoml serve``, with
what a Kubernetes pod would suffer from it: the memory of the server's whole process tree and the
latency of its liveness and readiness probes.

Each attack class is a function ``attack_<name>(target) -> AttackResult`` (oversized images, a
pixel bomb, bodies far over their limits, a gRPC message of 30 M empty strings, half-open and
slowloris connections, model control without a key, malformed JSON, undecodable image formats,
streams abandoned by their clients). ``run_attack`` wraps one with a monitor process that samples
the tree's RSS every 50 ms and asks /v2/health/live (HTTP port) and /readyz (probe port) every
100 ms on fresh connections, then waits for the RSS to settle and checks /classify still answers.

    python -m loadtest.attack                      # starts the suite on free ports (2 workers, 1536Mi)
    python -m loadtest.attack --quick --only pixel_bomb,slowloris
    python -m loadtest.attack --url http://127.0.0.1:3000 --grpc-port 9000 --probe-port 3001 --pid 1234

Prints a table (also written to reports/attack.md) and exits 1 when a goal is missed: an answer
other than the attack's expected ones (any 5xx but a tolerated 503 "busy"), a peak tree RSS over
1.2 GiB, RSS not back within 10 % of rest 10 s after, a probe failure or p99 >= 50 ms, /classify
not 200 after. tests/test_attack.py runs the same functions with the --quick sizes."""

from __future__ import annotations

import argparse
import errno
import http.client
import io
import json
import math
import resource
import select
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Collection, Protocol, TypeVar
from urllib.parse import urlsplit

from common.files import atomic_write
from common.resources import resident_bytes
from loadtest.overload import percentile as overload_percentile

MiB = 1024 * 1024
GiB = 1024 * MiB

# The server as the pod runs it: two workers under the pod's memory limit (the server budgets 0.8 of
# it over its process tree), one ONNX Runtime thread each, a short header timeout, model control off.
SETTINGS = {"SUITE_WORKERS": "2", "SUITE_MEMORY_LIMIT": "1536Mi", "SUITE_INTRA_OP_THREADS": "1",
            "SUITE_HEADER_TIMEOUT_S": "2", "SUITE_MODEL_CONTROL": "none"}
REQUEST_TIMEOUT_S = 25.0  # a client gives up on one answer after this: keeps every attack under 30 s
GRPC_SEND_LIMIT = 128 * MiB
# Text that must never reach a client: a stack trace, or a path that maps the server's filesystem.
LEAKS = ("Traceback", "/root/", "/tmp/", "/home/", "/usr/lib/", "site-packages")
T = TypeVar("T")


class Target(Protocol):
    """What an attack needs of a server: loadtest.servers.Server and RunningSuite both fit."""

    url: str
    grpc_port: int | None
    probe_port: int | None


@dataclass(frozen=True)
class Goals:
    peak_rss_bytes: int = int(1.2 * GiB)
    recovery_s: float = 10.0
    recovery_fraction: float = 0.10  # back within this much over the resting RSS
    probe_p99_ms: float = 50.0


@dataclass
class AttackResult:
    name: str
    description: str
    statuses: Counter = field(default_factory=Counter)  # HTTP status, gRPC code or what a connection saw -> count
    failures: list[str] = field(default_factory=list)  # one line per answer the spec does not allow
    notes: list[str] = field(default_factory=list)  # figures worth reporting: answer times, 503s, closed connections


@dataclass
class Answer:
    status: int | str  # the HTTP status, or what happened instead ("timeout", "ConnectionResetError")
    body: bytes = b""
    seconds: float = 0.0
    sent: int = 0  # body bytes sent before the answer came (less than the body: refused before reading it)
    content_type: str = ""

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


# ---- HTTP and gRPC clients -----------------------------------------------------------------------

def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


def http_request(url: str, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                 timeout: float = REQUEST_TIMEOUT_S, chunk: int = 256 * 1024) -> Answer:
    """One request on a fresh connection. The body goes out in chunks, and sending stops as soon as
    the server answers: a server that refuses an oversized body before reading it (as it should)
    would otherwise reset the connection under the client, and the client would lose the answer."""
    host, port = host_port(url)
    started = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    sent = 0
    try:
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            for name, value in (headers or {}).items():
                conn.putheader(name, value)
            if body is not None or method == "POST":
                conn.putheader("Content-Length", str(len(body or b"")))
            conn.endheaders()
            if body:
                sock = conn.sock
                poller = select.poll()
                poller.register(sock, select.POLLIN)
                view = memoryview(body)
                while sent < len(body) and not poller.poll(0):
                    sent += sock.send(view[sent:sent + chunk])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading: its answer may still be there to read
        response = conn.getresponse()
        data = response.read()
        return Answer(response.status, data, time.perf_counter() - started, sent,
                      response.getheader("content-type", "") or "")
    except TimeoutError:
        return Answer("timeout", b"", time.perf_counter() - started, sent)
    except (OSError, http.client.HTTPException) as exc:
        return Answer(type(exc).__name__, b"", time.perf_counter() - started, sent)
    finally:
        conn.close()


def post_json(url: str, path: str, payload: Any | bytes, headers: dict[str, str] | None = None,
              timeout: float = REQUEST_TIMEOUT_S) -> Answer:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return http_request(url, "POST", path, body, {"Content-Type": "application/json", **(headers or {})}, timeout)


def post_image(url: str, path: str, data: bytes, content_type: str = "image/png",
               timeout: float = REQUEST_TIMEOUT_S) -> Answer:
    return http_request(url, "POST", path, data, {"Content-Type": content_type}, timeout)


def concurrently(calls: list[Callable[[], T]]) -> list[T]:
    """Every call at once, each on a thread of its own."""
    with ThreadPoolExecutor(max_workers=max(1, len(calls))) as pool:
        return list(pool.map(lambda call: call(), calls))


def grpc_channel(target: Target):
    import grpc

    host, _ = host_port(target.url)
    return grpc.insecure_channel(f"{host}:{target.grpc_port}", options=[
        ("grpc.max_send_message_length", GRPC_SEND_LIMIT), ("grpc.max_receive_message_length", 16 * MiB)])


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return b"".join([_varint(number << 3 | 2), _varint(len(payload)), payload])


def grpc_flood_request(count: int, model: str = "classify") -> bytes:
    """The serialized ModelInferRequest for ``model`` with one BYTES input of shape [count] holding
    ``count`` empty ``bytes_contents``: the same bytes as ``contents.bytes_contents.extend([b""] *
    count)`` then SerializeToString() (tests/test_attack.py checks), written directly because the
    protobuf message of 30 M elements costs the client about 1 GB and seconds of CPU that the
    server's own CPUs would pay for; this costs 2 bytes an element."""
    from tritonclient.grpc import service_pb2 as pb

    tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[count])
    contents_field = pb.ModelInferRequest.InferInputTensor.DESCRIPTOR.fields_by_name["contents"].number
    bytes_field = pb.InferTensorContents.DESCRIPTOR.fields_by_name["bytes_contents"].number
    inputs_field = pb.ModelInferRequest.DESCRIPTOR.fields_by_name["inputs"].number
    empty = _varint(bytes_field << 3 | 2) + _varint(0)  # one empty bytes element
    # Fields of a message may come in any order and concatenated messages merge: the tensor's
    # name, datatype and shape, then its contents.
    tensor_wire = tensor.SerializeToString() + _length_delimited(contents_field, empty * count)
    return pb.ModelInferRequest(model_name=model).SerializeToString() + _length_delimited(inputs_field, tensor_wire)


# ---- payloads ------------------------------------------------------------------------------------

@lru_cache(maxsize=2)
def natural_png(side: int, seed: int = 7) -> bytes:
    """A ``side`` x ``side`` RGB PNG that compresses like a photograph (2-6 MB at 2000): smooth colour
    fields, gradients and a little sensor noise. Noise alone would not compress (12 MB at 2000)."""
    import numpy as np
    from PIL import Image

    from loadtest.payloads import png_bytes

    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    pixels = np.asarray(coarse.resize((side, side), Image.Resampling.BICUBIC), np.float32) * 0.75
    ramp = np.linspace(0, 60, side, dtype=np.float32)
    pixels += ramp[None, :, None] * np.array([1.0, 0.6, 0.2], np.float32) + ramp[:, None, None] * 0.5
    pixels += rng.standard_normal(pixels.shape, dtype=np.float32) * 1.2
    return png_bytes(np.clip(pixels, 0, 255).astype(np.uint8))


@lru_cache(maxsize=4)
def palette_png(side: int) -> bytes:
    """A palette PNG declaring ``side`` x ``side`` pixels, all zero, at one bit a pixel: a few KiB
    that decode to ``side``² bytes or more."""
    from PIL import Image

    image = Image.new("P", (side, side), 0)
    image.putpalette([0, 0, 0, 255, 255, 255])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", bits=1)
    return buffer.getvalue()


@lru_cache(maxsize=4)
def digit_as(format_name: str) -> bytes:
    """The load tests' digit in another image format (TIFF, GIF, ICO)."""
    from PIL import Image

    from loadtest.payloads import digit_png

    image = Image.open(io.BytesIO(digit_png()[0]))
    buffer = io.BytesIO()
    (image.convert("P") if format_name == "GIF" else image).save(buffer, format=format_name)
    return buffer.getvalue()


def bytes_tensor_json(model_input: str, count: int) -> bytes:
    """An OIP REST body with one BYTES tensor of ``count`` "a" strings, built by byte repetition: a
    JSON list of 12 M Python strings would cost the client a gigabyte."""
    return b"".join([b'{"inputs": [{"name": "', model_input.encode(), b'", "datatype": "BYTES", "shape": [',
                     str(count).encode(), b'], "data": [', b'"a",' * (count - 1), b'"a"]}]}'])


# ---- checking answers ----------------------------------------------------------------------------

def error_body_problem(answer: Answer, names: Collection[str] = ()) -> str | None:
    """What is wrong with a 4xx body, or None: it must be ``{"error": ..., "field": ...}`` and, when
    ``names`` are given, name one of them (case-insensitive)."""
    try:
        payload = json.loads(answer.body)
    except ValueError:
        return f"not a JSON body: {answer.text[:120]!r}"
    if not isinstance(payload, dict) or not isinstance(payload.get("error"), str):
        return f"no 'error' string: {answer.text[:120]!r}"
    if not isinstance(payload.get("field"), str):
        return f"no 'field' naming what is wrong: {answer.text[:120]!r}"
    said = (payload["error"] + " " + payload["field"]).lower()
    if names and not any(name.lower() in said for name in names):
        return f"names none of {list(names)}: {answer.text[:160]!r}"
    return None


def expect(result: AttackResult, label: str, answer: Answer, allowed: Collection[int | str],
           names: Collection[str] = ()) -> bool:
    """Counts the answer, and records a failure when its status is not ``allowed``, when a 4xx body
    is not a named JSON error, or when any non-200 body leaks a trace or a path. -> allowed."""
    result.statuses[answer.status] += 1
    ok = answer.status in allowed
    if not ok:
        result.failures.append(f"{label}: {answer.status} (expected {' or '.join(map(str, allowed))}): "
                               f"{answer.text[:200]!r}")
    # 200 bodies are left out: generated text may say "Traceback" or "/tmp/" (the text model read Python's docs).
    if answer.status != 200:
        leaked = [leak for leak in LEAKS if leak in answer.text]
        if leaked:
            result.failures.append(f"{label}: the {answer.status} body shows {leaked}: {answer.text[:200]!r}")
            ok = False
    if ok and isinstance(answer.status, int) and 400 <= answer.status < 500:
        problem = error_body_problem(answer, names)
        if problem:
            result.failures.append(f"{label}: {answer.status} {problem}")
            ok = False
    return ok


def png_size(data: bytes) -> tuple[int, int] | None:
    from PIL import Image

    try:
        return Image.open(io.BytesIO(data)).size
    except Exception:  # noqa: BLE001 - whatever PIL raises, the answer is not a PNG
        return None


# ---- the attacks ---------------------------------------------------------------------------------

# A 2000x2000 RGB /denoise is 12 M pixels through a 17-layer network: about a minute of one core here
# whatever the memory, so its answers get more time than the others.
DENOISE_TIMEOUT_S = 240.0


def attack_denoise_large(target: Target, quick: bool = False) -> AttackResult:
    side, burst = (1200, 2) if quick else (2000, 2)
    result = AttackResult("denoise_large", f"/denoise of a {side}x{side} RGB PNG, once then {burst} at once")
    png = natural_png(side)
    result.notes.append(f"PNG {len(png) / MiB:.1f} MiB")

    def check(label: str, answer: Answer) -> None:
        if expect(result, label, answer, {200, 503}) and answer.status == 200:
            size = png_size(answer.body)
            if size != (side, side):
                result.failures.append(f"{label}: 200 with an image of {size}, not {side}x{side}")

    first = post_image(target.url, "/denoise", png, timeout=DENOISE_TIMEOUT_S)
    check("one", first)
    answers = concurrently([lambda: post_image(target.url, "/denoise", png, timeout=DENOISE_TIMEOUT_S)] * burst)
    for i, answer in enumerate(answers):
        check(f"burst #{i}", answer)
    times = [a.seconds for a in [first, *answers]]
    result.notes.append(f"answer times {min(times):.1f}-{max(times):.1f} s; 503 busy: "
                        f"{sum(a.status == 503 for a in [first, *answers])}")
    return result


def attack_pixel_bomb(target: Target, quick: bool = False) -> AttackResult:
    burst = 4 if quick else 8
    result = AttackResult("pixel_bomb", f"1-bit palette PNG of 4000x4000 zeros, {burst} at once to /classify and "
                                        f"to /segment; 6000x6000 (36 M pixels) once each")
    bomb, huge = palette_png(4000), palette_png(6000)
    result.notes.append(f"4000x4000 in {len(bomb) / 1024:.1f} KiB, 6000x6000 in {len(huge) / 1024:.1f} KiB")
    routes = ["/classify"] * burst + ["/segment"] * burst
    answers = concurrently([lambda route=route: post_image(target.url, route, bomb) for route in routes])
    for route, answer in zip(routes, answers):
        expect(result, f"4000x4000 {route}", answer, {200, 413})
    for route in ("/classify", "/segment"):
        answer = post_image(target.url, route, huge)
        expect(result, f"6000x6000 {route}", answer, {413}, names=("pixel",))
        result.notes.append(f"6000x6000 {route}: {answer.status} in {answer.seconds * 1000:.0f} ms")
    result.notes.append(f"4000x4000 answers in {max(a.seconds for a in answers):.1f} s at most")
    return result


def attack_unknown_model_big_json(target: Target, quick: bool = False) -> AttackResult:
    # 45 MiB of '"a",' (4 bytes each): under the 64 MiB body ceiling, so only knowing the model is
    # unknown before reading the body saves the server from reading and decoding it.
    count = 45 * MiB // 4
    result = AttackResult("unknown_model_big_json", f"a 45 MiB OIP body ({count / 1e6:.1f} M BYTES elements) "
                                                    f"to /v2/models/nope/infer")
    body = bytes_tensor_json("text_input", count)
    answer = post_json(target.url, "/v2/models/nope/infer", body)
    del body
    expect(result, "nope/infer", answer, {404, 413}, names=("nope", "model", "body", "limit"))
    result.notes.append(f"{answer.status} in {answer.seconds * 1000:.0f} ms after sending {answer.sent / MiB:.1f} MiB "
                        f"of 45")
    if answer.seconds > 5:
        result.failures.append(f"answered in {answer.seconds:.1f} s: the body was read before the refusal")
    return result


def attack_grpc_bytes_flood(target: Target, quick: bool = False) -> AttackResult:
    import grpc
    from tritonclient.grpc import service_pb2 as pb

    count = 30_000_000
    result = AttackResult("grpc_bytes_flood", f"gRPC ModelInfer to classify: one BYTES input of {count // 10**6} M "
                                              f"empty elements (a 60 MB message)")
    if not target.grpc_port:
        result.failures.append("no gRPC port to attack")
        return result
    request = grpc_flood_request(count)
    with grpc_channel(target) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=None,
                                    response_deserializer=pb.ModelInferResponse.FromString)
        started = time.perf_counter()
        try:
            infer(request, timeout=REQUEST_TIMEOUT_S)
            code, details = "OK", ""
        except grpc.RpcError as exc:
            code, details = exc.code().name, exc.details() or ""
        seconds = time.perf_counter() - started
    del request
    result.statuses[f"grpc {code}"] += 1
    result.notes.append(f"{code} in {seconds:.2f} s: {details[:100]}")
    if code not in ("RESOURCE_EXHAUSTED", "INVALID_ARGUMENT"):
        result.failures.append(f"ModelInfer -> {code} (expected RESOURCE_EXHAUSTED or INVALID_ARGUMENT): {details[:200]}")
    if any(leak in details for leak in LEAKS):
        result.failures.append(f"the status details leak: {details[:200]!r}")
    if seconds > 10:
        result.failures.append(f"refused after {seconds:.1f} s, not within a few seconds")
    return result


def raise_open_files(needed: int) -> int:
    """Raises this process's soft RLIMIT_NOFILE to its hard limit; -> the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _answer_status(data: bytes) -> int | str:
    """The status of an answer's first bytes ("HTTP/1.1 408 ..."), or "closed" for none."""
    if not data:
        return "closed"
    parts = data.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else "garbage"


def _closed_state(sock: socket.socket) -> int | str | None:
    """What a readable (or failed) socket says: an answer's status, "closed", "reset", an errno
    name; None while it is still open with nothing to read."""
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        return "reset" if error == errno.ECONNRESET else errno.errorcode.get(error, str(error))
    try:
        return _answer_status(sock.recv(256))
    except BlockingIOError:
        return None
    except ConnectionResetError:
        return "reset"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def hold_half_open(host: str, port: int, count: int, hold_s: float) -> tuple[Counter, int]:
    """Opens ``count`` connections (non-blocking connects) that never send a byte, holds them
    ``hold_s`` seconds while watching for the server to answer or close them, then closes them.
    -> (final state of each: an answer's status, "closed", "reset", "open" or "pending" (never
    connected), how many connected)."""
    states: Counter = Counter()
    raise_open_files(count + 512)
    socks: dict[int, socket.socket] = {}
    poller = select.poll()
    for _ in range(count):
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError as exc:  # out of file descriptors
            states[errno.errorcode.get(exc.errno or 0, type(exc).__name__)] += 1
            continue
        sock.setblocking(False)
        try:
            code = sock.connect_ex((host, port))
        except OSError as exc:  # out of ports
            code = exc.errno or -1
        if code not in (0, errno.EINPROGRESS, errno.EAGAIN):
            states[errno.errorcode.get(code, str(code))] += 1
            sock.close()
            continue
        socks[sock.fileno()] = sock
        poller.register(sock, select.POLLOUT | select.POLLIN)
    connected: set[int] = set()
    deadline = time.monotonic() + hold_s
    while socks and time.monotonic() < deadline:
        for fd, events in poller.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            sock = socks[fd]
            if events & (select.POLLIN | select.POLLHUP | select.POLLERR):
                state = _closed_state(sock)
                if state is None:
                    continue
                if isinstance(state, int) or state == "closed":
                    connected.add(fd)  # an answer or a FIN: it had connected (a failed connect gives an errno)
                states[state] += 1
                poller.unregister(fd)
                del socks[fd]
                sock.close()
            elif events & select.POLLOUT:
                connected.add(fd)
                poller.modify(fd, select.POLLIN)  # connected: from now on only an answer or a close matters
    for fd, sock in socks.items():
        states["open" if fd in connected else "pending"] += 1
        sock.close()
    return states, len(connected)


def _half_open(name: str, target: Target, port: int | None, count: int, hold_s: float) -> AttackResult:
    result = AttackResult(name, f"{count} connections that send nothing, held {hold_s:g} s")
    if not port:
        result.failures.append("no port to attack")
        return result
    limit = raise_open_files(count + 512)
    if limit < count + 64:
        result.notes.append(f"only {limit} open files allowed: fewer connections")
        count = limit - 64
    host, _ = host_port(target.url)
    states, connected = hold_half_open(host, port, count, hold_s)
    result.statuses.update(states)
    for state in states:
        # A 503 refusal is the connection cap at work, a 408 the header timeout; any other 5xx is a fault.
        if isinstance(state, int) and state >= 500 and state != 503:
            result.failures.append(f"{states[state]} connections answered {state}")
    closed = sum(n for s, n in states.items() if isinstance(s, int) or s in ("closed", "reset"))
    result.notes.append(f"{connected} of {count} connected; {closed} answered or closed by the server within "
                        f"{hold_s:g} s")
    return result


def attack_half_open_probe_port(target: Target, quick: bool = False) -> AttackResult:
    return _half_open("half_open_probe_port", target, target.probe_port, *((1000, 5.0) if quick else (3000, 8.0)))


def attack_half_open_http_port(target: Target, quick: bool = False) -> AttackResult:
    return _half_open("half_open_http_port", target, host_port(target.url)[1],
                      *((1000, 5.0) if quick else (2100, 8.0)))


def attack_slowloris(target: Target, quick: bool = False) -> AttackResult:
    count, seconds = (50, 5.0) if quick else (200, 8.0)
    result = AttackResult("slowloris", f"{count} connections sending a request line a byte every 0.5 s for "
                                       f"{seconds:g} s")
    host, port = host_port(target.url)
    raise_open_files(count + 512)
    line = b"GET /v2/health/live?" + b"x" * 64  # never completes within the attack (2 bytes a second)
    socks: list[socket.socket] = []
    for _ in range(count):
        try:
            sock = socket.create_connection((host, port), timeout=2)
        except OSError as exc:
            result.statuses[f"connect {type(exc).__name__}"] += 1
            continue
        sock.setblocking(False)
        socks.append(sock)
    open_socks = {sock.fileno(): sock for sock in socks}
    started, step = time.monotonic(), 0
    while open_socks:
        poller = select.poll()
        for fd in open_socks:
            poller.register(fd, select.POLLIN)
        for fd, _ in poller.poll(0):
            state = _closed_state(open_socks[fd])
            if state is not None:
                result.statuses[state] += 1
                open_socks.pop(fd).close()
        if time.monotonic() - started >= seconds:
            break
        for fd, sock in list(open_socks.items()):
            try:
                sock.send(line[step % len(line):step % len(line) + 1])
            except (BrokenPipeError, ConnectionResetError):
                result.statuses["reset"] += 1
                open_socks.pop(fd).close()
            except BlockingIOError:
                pass
        step += 1
        time.sleep(max(0.0, started + step * 0.5 - time.monotonic()))
    for sock in open_socks.values():
        sock.close()
    if open_socks:
        result.statuses["open"] = len(open_socks)
    closed = sum(n for s, n in result.statuses.items() if s in (408, "closed", "reset"))
    result.notes.append(f"{closed} of {len(socks)} closed by the server (408, FIN or reset) within {seconds:g} s")
    if open_socks:
        result.failures.append(f"{len(open_socks)} connections still open after {seconds:g} s of a byte every 0.5 s")
    for state, n in result.statuses.items():
        if isinstance(state, int) and state >= 500 and state != 503:
            result.failures.append(f"{n} connections answered {state}")
    return result


def attack_model_control(target: Target, quick: bool = False) -> AttackResult:
    result = AttackResult("model_control", "unload classify over HTTP (bare, then JSON + any bearer) and gRPC "
                                           "with model control off")
    path = "/v2/repository/models/classify/unload"
    expect(result, "bare unload", http_request(target.url, "POST", path), {403}, names=("model_control", "model control"))
    expect(result, "unload with JSON and a bearer",
           http_request(target.url, "POST", path, headers={"Content-Type": "application/json",
                                                            "Authorization": "Bearer anything"}),
           {403}, names=("model_control", "model control"))
    if target.grpc_port:
        import grpc
        from tritonclient.grpc import service_pb2 as pb, service_pb2_grpc as pb_grpc

        with grpc_channel(target) as channel:
            try:
                pb_grpc.GRPCInferenceServiceStub(channel).RepositoryModelUnload(
                    pb.RepositoryModelUnloadRequest(model_name="classify"), timeout=10)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
        result.statuses[f"grpc {code}"] += 1
        if code != "PERMISSION_DENIED":
            result.failures.append(f"gRPC RepositoryModelUnload -> {code} (expected PERMISSION_DENIED)")
    else:
        result.notes.append("no gRPC port: gRPC unload not tried")
    expect(result, "/classify after the unloads", classify_digit(target), {200})
    return result


def attack_malformed_json(target: Target, quick: bool = False) -> AttackResult:
    result = AttackResult("malformed_json", "100,000 nested [, a 5,000-digit number, outputs.parameters a string, "
                                            "NaN")
    infer = "/v2/models/classify/infer"
    expect(result, "100,000 [", post_json(target.url, infer, b"[" * 100_000), {400}, names=("nested",))
    digits = (b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [1'
              + b"0" * 4999 + b"]}]}")
    expect(result, "5,000 digits", post_json(target.url, infer, digits), {400}, names=("digits", "json"))
    zeros = {"name": "image", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.0] * 784}
    expect(result, "outputs.parameters 'x'",
           post_json(target.url, infer, {"inputs": [zeros], "outputs": [{"name": "probabilities", "parameters": "x"}]}),
           {400}, names=("parameters",))
    expect(result, "NaN to /sample", post_json(target.url, "/sample", b'{"n": NaN}'), {400},
           names=("nan", "json", "finite"))
    return result


def attack_oversized_json(target: Target, quick: bool = False) -> AttackResult:
    result = AttackResult("oversized_json", "a 2 MiB prompt to /generate; an OIP binary header declaring "
                                            "100,000 images over a tiny body")
    prompt = b'{"prompt": "' + b"a" * (2 * MiB) + b'"}'
    answer = post_json(target.url, "/generate", prompt)
    expect(result, "2 MiB prompt", answer, {413}, names=("limit",))
    result.notes.append(f"2 MiB prompt: {answer.status} in {answer.seconds * 1000:.0f} ms")
    shape = [100_000, 1, 28, 28]
    head = json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": shape,
                                   "parameters": {"binary_data_size": math.prod(shape) * 4}}]}).encode()
    answer = http_request(target.url, "POST", "/v2/models/classify/infer", head + b"\0" * 16,
                          {"Content-Type": "application/octet-stream",
                           "Inference-Header-Content-Length": str(len(head))})
    expect(result, "100,000 images declared", answer, {400, 413}, names=("image",))
    return result


def attack_image_formats(target: Target, quick: bool = False) -> AttackResult:
    result = AttackResult("image_formats", "the digit as TIFF, GIF and ICO to /classify")
    for name, content_type in (("TIFF", "image/tiff"), ("GIF", "image/gif"), ("ICO", "image/x-icon")):
        expect(result, name, post_image(target.url, "/classify", digit_as(name), content_type), {415},
               names=("png",))
    return result


def max_new_tokens(target: Target, model: str = "generate") -> int | None:
    """The text model's max_new_tokens limit, from GET /models."""
    answer = http_request(target.url, "GET", "/models", timeout=10)
    if answer.status != 200:
        return None
    for entry in json.loads(answer.body):
        if entry.get("name") == model:
            return int(entry["contract"]["limits"]["max_new_tokens"])
    return None


def attack_stream_disconnect(target: Target, quick: bool = False) -> AttackResult:
    repeats = 20
    result = AttackResult("stream_disconnect", f"/generate of the longest answer, the client gone after 0.2 s, "
                                               f"{repeats} times")
    longest = max_new_tokens(target)
    if longest is None:
        result.failures.append("GET /models names no generate model with limits.max_new_tokens")
        longest = 256
    body = json.dumps({"prompt": "The", "max_new_tokens": longest, "ignore_eos": True}).encode()
    host, port = host_port(target.url)
    request = (f"POST /generate HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    for _ in range(repeats):
        try:
            with socket.create_connection((host, port), timeout=2) as sock:
                sock.sendall(request)
                time.sleep(0.2)
            result.statuses["left after 0.2 s"] += 1
        except OSError as exc:
            result.statuses[f"connect {type(exc).__name__}"] += 1
    answer = post_json(target.url, "/generate", {"prompt": "The", "max_new_tokens": 4}, timeout=5)
    if expect(result, "/generate of 4 tokens after", answer, {200}) and answer.seconds > 5:
        result.failures.append(f"/generate of 4 tokens took {answer.seconds:.1f} s: the abandoned ones still run")
    result.notes.append(f"max_new_tokens {longest}; then 4 tokens: {answer.status} in {answer.seconds:.2f} s")
    return result


@dataclass(frozen=True)
class Attack:
    run: Callable[[Target, bool], AttackResult]
    prepare: Callable[[bool], object] | None = None  # builds the payloads before the monitor starts


ATTACKS: dict[str, Attack] = {
    "denoise_large": Attack(attack_denoise_large, lambda quick: natural_png(1500 if quick else 2000)),
    "pixel_bomb": Attack(attack_pixel_bomb, lambda quick: (palette_png(4000), palette_png(6000))),
    "unknown_model_big_json": Attack(attack_unknown_model_big_json),
    "grpc_bytes_flood": Attack(attack_grpc_bytes_flood),
    "half_open_probe_port": Attack(attack_half_open_probe_port),
    "half_open_http_port": Attack(attack_half_open_http_port),
    "slowloris": Attack(attack_slowloris),
    "model_control": Attack(attack_model_control),
    "malformed_json": Attack(attack_malformed_json),
    "oversized_json": Attack(attack_oversized_json),
    "image_formats": Attack(attack_image_formats, lambda quick: [digit_as(f) for f in ("TIFF", "GIF", "ICO")]),
    "stream_disconnect": Attack(attack_stream_disconnect),
}


def classify_digit(target: Target) -> Answer:
    from loadtest.payloads import digit_png

    return post_image(target.url, "/classify", digit_png()[0], timeout=30)


# ---- memory and probes ---------------------------------------------------------------------------

def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (the serve process, its arbiter, every worker), from
    /proc/<pid>/task/<pid>/children; processes that ended meanwhile are left out."""
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        found.append(current)
        stack.extend(int(child) for child in children)
    return found


def tree_rss(pid: int) -> int:
    """The resident memory of ``pid``'s whole process tree, in bytes (a member that ended between
    the walk and the read counts 0)."""
    return sum(resident_bytes(member) for member in process_tree(pid))


def resting_rss(pid: int | None, idle_s: float = 0.0, window_s: float = 1.0) -> int | None:
    """The tree's RSS at rest: after ``idle_s`` of nothing, the median of samples over ``window_s``."""
    if pid is None:
        return None
    time.sleep(idle_s)
    samples = []
    end = time.monotonic() + window_s
    while time.monotonic() < end:
        samples.append(tree_rss(pid))
        time.sleep(0.1)
    return int(statistics.median(samples or [tree_rss(pid)]))


def _sample_rss(pid: int, stop: threading.Event, interval_s: float, peak: list[int]) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], tree_rss(pid))
        stop.wait(interval_s)


def _poll_probe(host: str, port: int, path: str, stop: threading.Event, interval_s: float,
                latencies: list[float], failures: list[str]) -> None:
    """GET ``path`` every ``interval_s`` on a fresh connection with a 2 s timeout, as a kubelet does;
    a timeout, an error or a non-200 is a failure (its time still counts in the latencies)."""
    while not stop.is_set():
        started = time.perf_counter()
        conn = http.client.HTTPConnection(host, port, timeout=2)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                failures.append(f"{path} on {port}: {response.status}")
        except (OSError, http.client.HTTPException) as exc:
            failures.append(f"{path} on {port}: {type(exc).__name__}")
        finally:
            conn.close()
        elapsed = time.perf_counter() - started
        latencies.append(elapsed * 1000)
        stop.wait(max(0.0, interval_s - elapsed))


def _monitor(conn, host: str, http_port: int, probe_port: int | None, pid: int | None) -> None:
    """The monitor process: RSS sampler and probe pollers until told to stop, then the figures."""
    stop = threading.Event()
    peak = [0]
    probes: dict[str, tuple[list[float], list[str]]] = {"live": ([], [])}
    threads = [threading.Thread(target=_poll_probe, args=(host, http_port, "/v2/health/live", stop, 0.1,
                                                          *probes["live"]), daemon=True)]
    if probe_port:
        probes["ready"] = ([], [])
        threads.append(threading.Thread(target=_poll_probe, args=(host, probe_port, "/readyz", stop, 0.1,
                                                                  *probes["ready"]), daemon=True))
    if pid:
        threads.append(threading.Thread(target=_sample_rss, args=(pid, stop, 0.05, peak), daemon=True))
    for thread in threads:
        thread.start()
    conn.send("started")
    conn.recv()
    stop.set()
    for thread in threads:
        thread.join(timeout=5)
    conn.send({"peak_rss": peak[0] if pid else None, "probes": probes})


class Monitor:
    """The RSS sampler and the probe pollers in a process of their own, so that the attack's own
    work in this process (building payloads, thousands of sockets) cannot hold them up through the
    GIL and pass for slow probes."""

    def __init__(self, target: Target, pid: int | None):
        import multiprocessing

        host, http_port = host_port(target.url)
        context = multiprocessing.get_context("spawn")  # never fork a process that holds gRPC threads
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_monitor, args=(child, host, http_port, target.probe_port, pid),
                                       daemon=True)

    def __enter__(self) -> "Monitor":
        self.process.start()
        if not self.conn.poll(60) or self.conn.recv() != "started":
            self.process.kill()
            raise RuntimeError("the monitor process did not start")
        return self

    def stop(self) -> dict:
        self.conn.send("stop")
        figures = self.conn.recv() if self.conn.poll(30) else {"peak_rss": None, "probes": {}}
        self.process.join(timeout=10)
        return figures

    def __exit__(self, *exc: object) -> None:
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def percentile(values: list[float], q: float) -> float | None:
    return overload_percentile(values, q) if values else None


@dataclass
class Outcome:
    result: AttackResult
    rest_rss: int | None  # bytes, before the attack (None: no pid to measure)
    peak_rss: int | None
    recovered_s: float | None  # seconds until back within the goal; inf: not in time; None: not measured
    probe_ms: dict[str, list[float]]  # "live" / "ready" -> latencies
    probe_failures: list[str]
    after: Answer  # POST /classify of a digit after the attack
    seconds: float  # the attack's own duration
    missed: list[str] = field(default_factory=list)  # the goals missed, briefly

    def p99(self, probe: str) -> float | None:
        return percentile(self.probe_ms.get(probe, []), 0.99)


def evaluate(outcome: Outcome, goals: Goals) -> list[str]:
    """The goals an attack missed, one short phrase each (the details are in result.failures)."""
    missed = []
    if outcome.result.failures:
        missed.append(f"{len(outcome.result.failures)} wrong answer(s)")
    if outcome.peak_rss is not None and outcome.peak_rss > goals.peak_rss_bytes:
        missed.append(f"peak RSS {outcome.peak_rss / MiB:.0f} MiB")
    if outcome.recovered_s is not None and math.isinf(outcome.recovered_s):
        missed.append(f"RSS not back within {goals.recovery_fraction:.0%} in {goals.recovery_s:g} s")
    for probe in ("live", "ready"):
        p99 = outcome.p99(probe)
        if p99 is not None and p99 >= goals.probe_p99_ms:
            missed.append(f"{probe} p99 {p99:.0f} ms")
    if outcome.probe_failures:
        missed.append(f"{len(outcome.probe_failures)} probe failure(s)")
    if outcome.after.status != 200:
        missed.append(f"/classify after: {outcome.after.status}")
    return missed


def run_attack(name: str, target: Target, pid: int | None = None, goals: Goals = Goals(),
               quick: bool = False) -> Outcome:
    """One attack class with the monitor around it, then the recovery and the /classify check."""
    attack = ATTACKS[name]
    if attack.prepare is not None:
        attack.prepare(quick)
    rest = resting_rss(pid, window_s=0.5)
    with Monitor(target, pid) as monitor:
        started = time.monotonic()
        try:
            result = attack.run(target, quick)
        except Exception as exc:  # noqa: BLE001 - a client-side error is reported, and the other attacks still run
            result = AttackResult(name, "(the attack raised)", failures=[f"the attack raised {exc!r}"])
        seconds = time.monotonic() - started
        figures = monitor.stop()
    recovered_s = None
    if pid is not None and rest is not None:
        recovered_s = math.inf
        settle_start = time.monotonic()
        while time.monotonic() - settle_start <= goals.recovery_s:
            if tree_rss(pid) <= rest * (1 + goals.recovery_fraction):
                recovered_s = time.monotonic() - settle_start
                break
            time.sleep(0.1)
    probes = figures.get("probes", {})
    outcome = Outcome(result, rest, figures.get("peak_rss"), recovered_s,
                      {probe: values[0] for probe, values in probes.items()},
                      [failure for _, failures in probes.values() for failure in failures],
                      classify_digit(target), seconds)
    outcome.missed = evaluate(outcome, goals)
    return outcome


# ---- the report ----------------------------------------------------------------------------------

def _statuses(counter: Counter) -> str:
    return ", ".join(f"{status}×{n}" for status, n in sorted(counter.items(), key=lambda kv: str(kv[0])))


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def table_row(outcome: Outcome) -> str:
    recovered = ("n/a" if outcome.recovered_s is None else
                 "> 10" if math.isinf(outcome.recovered_s) else f"{outcome.recovered_s:.1f}")
    peak = "n/a" if outcome.peak_rss is None else f"{outcome.peak_rss / MiB:.0f}"
    verdict = "ok" if not outcome.missed else "MISSED: " + "; ".join(outcome.missed)
    return (f"| {outcome.result.name} | {_statuses(outcome.result.statuses)} | {peak} | {recovered} | "
            f"{_ms(outcome.p99('live'))} | {_ms(outcome.p99('ready'))} | {len(outcome.probe_failures)} | {verdict} |")


def outcome_details(outcome: Outcome) -> str:
    """The attack's description, figures and every failure, a line each."""
    result = outcome.result
    rest = "" if outcome.rest_rss is None else f"; tree RSS at rest {outcome.rest_rss / MiB:.0f} MiB"
    lines = [f"- {result.name}: {result.description} ({outcome.seconds:.1f} s{rest})"]
    lines += [f"  - {note}" for note in result.notes]
    lines += [f"  - FAILED {failure}" for failure in result.failures]
    lines += [f"  - probe failure: {failure}" for failure in outcome.probe_failures[:10]]
    if outcome.after.status != 200:
        lines.append(f"  - /classify after: {outcome.after.status} {outcome.after.text[:200]!r}")
    return "\n".join(lines)


def report(outcomes: list[Outcome], goals: Goals, rest: int | None, server: str) -> str:
    lines = ["# Attack suite", "", server]
    if rest is not None:
        lines.append(f"tree RSS at rest (after 3 s idle): {rest / MiB:.0f} MiB")
    lines += ["", "| attack | statuses | peak tree RSS (MiB) | back within 10 % after (s) | live p99 (ms) | "
                  "ready p99 (ms) | probe failures | verdict |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [table_row(outcome) for outcome in outcomes]
    met = not any(outcome.missed for outcome in outcomes)
    lines += ["", f"goals: no 5xx but a tolerated 503, peak tree RSS <= {goals.peak_rss_bytes / MiB:.0f} MiB, back "
                  f"within {goals.recovery_fraction:.0%} of rest in {goals.recovery_s:g} s, live and ready p99 < "
                  f"{goals.probe_p99_ms:g} ms with 0 failures, /classify 200 after: {'met' if met else 'MISSED'}",
              "", "Details:", ""]
    lines += [outcome_details(outcome) for outcome in outcomes]
    return "\n".join(lines) + "\n"


def write_report(text: str, path: Path) -> None:
    """Written to a temporary file, then renamed: a reader never sees half a report."""
    atomic_write(path, text.encode())


def main(argv: list[str] | None = None) -> int:
    from loadtest.servers import REPO, RunningSuite, start_suite

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="attack a running suite (default: start one on free ports)")
    parser.add_argument("--grpc-port", type=int, default=9000, help="with --url")
    parser.add_argument("--probe-port", type=int, default=3001, help="with --url")
    parser.add_argument("--pid", type=int, help="with --url: the `bentoml serve` process, to measure its tree's RSS")
    parser.add_argument("--only", help=f"comma-separated attack classes, of: {', '.join(ATTACKS)}")
    parser.add_argument("--quick", action="store_true", help="the lighter sizes the tests use")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else list(ATTACKS)
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        parser.error(f"unknown attack class {unknown}; known: {', '.join(ATTACKS)}")
    goals = Goals()
    server = None
    if args.url:
        target: Any = RunningSuite(args.url.rstrip("/"), args.grpc_port, args.probe_port)
        pid = args.pid
        described = f"server: the running suite at {target.url}" + ("" if pid else " (no --pid: RSS not measured)")
    else:
        workdir = Path(tempfile.mkdtemp(prefix="suite-attack-"))
        server = start_suite(SETTINGS, workdir / "serve.log")
        target, pid = server, server.process.pid
        described = (f"server: `bentoml serve` started here with {', '.join(f'{k}={v}' for k, v in SETTINGS.items())}"
                     f"; log {workdir / 'serve.log'}")
    try:
        rest = resting_rss(pid, idle_s=3.0)
        outcomes = []
        for name in names:
            outcome = run_attack(name, target, pid, goals, args.quick)
            print(table_row(outcome), flush=True)
            outcomes.append(outcome)
    finally:
        if server is not None:
            server.stop()
    text = report(outcomes, goals, rest, described)
    print()
    print(text)
    write_report(text, REPO / "reports" / "attack.md")
    return 1 if any(outcome.missed for outcome in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
