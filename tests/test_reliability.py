"""Reliability against a real `bentoml serve`: malformed requests on every protocol, fuzzing
(schemathesis over the served OpenAPI document, malformed gRPC ModelInfer), model control (hot
reload of a newly exported version under load), a killed worker, a store holding a corrupt model,
an overload burst, and SIGTERM with requests in flight."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import threading
import time

import numpy as np
import pytest
import requests
import tritonclient.grpc as tgrpc
from tritonclient.utils import InferenceServerException

from loadtest.fuzz import grpc_fuzz, schemathesis_run
from loadtest.payloads import digit_png, png_bytes
from loadtest.servers import start_suite, worker_pids
from tests.conftest import ADMIN_KEY, MODEL_CONTROL, RECURRENT, SECOND, VARIANT, control

JSON = {"Content-Type": "application/json"}


def still_serving(url: str) -> None:
    assert requests.post(f"{url}/sample", json={"n": 1, "seed": 0}, timeout=60).status_code == 200


def oip_binary(head: dict, blob: bytes) -> tuple[bytes, dict]:
    header = json.dumps(head).encode()
    return header + blob, {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}


def fp32_input(shape, size) -> dict:
    return {"inputs": [{"name": "image", "datatype": "FP32", "shape": shape, "parameters": {"binary_data_size": size}}]}


BYTES_BAD = b"\xff\xff\xff\x7f" + b"abc"  # an element claiming 2 GB of a 3-byte tensor
MALFORMED = [
    # (path, headers, body, status, word the error names)
    ("/v2/models/classify/infer", JSON, json.dumps({"inputs": [{"name": "image", "datatype": "FP32",
                                                                 "shape": [100000, 100000, 100000], "data": [0]}]}),
     400, "image"),  # billions of elements claimed: refused without allocating
    ("/v2/models/classify/infer", JSON, json.dumps({"inputs": [{"name": "image", "datatype": "FP32",
                                                                 "shape": [0, 2**62], "data": []}]}), 400, "image"),
    ("/v2/models/classify/infer", *oip_binary(fp32_input([1, 1, 28, 28], 16), b"\0" * 16)[::-1], 400, "image"),
    ("/v2/models/classify/infer", {"Inference-Header-Content-Length": "9999"}, b"{}", 400, "inference-header"),
    ("/v2/models/classify/infer", {"Inference-Header-Content-Length": "ten"}, b"{}", 400, "inference-header"),
    ("/v2/models/generate/infer", *oip_binary({"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1],
                                                           "parameters": {"binary_data_size": 7}}]}, BYTES_BAD)[::-1],
     400, "text_input"),
    ("/v2/models/classify/infer", JSON, b'{"inputs": [', 400, "json"),
    ("/v1/completions", {"Content-Type": "text/plain"}, b'{"prompt": "a"}', 415, "content-type"),
    ("/v1/completions", JSON, b"{not json", 400, "json"),
    ("/generate_stream", {"Content-Type": "text/plain"}, b'{"prompt": "a"}', 415, "content-type"),
    ("/sample", {}, b'{"n": 1', 400, "json"),  # no content type: taken as JSON, and it is not
    ("/classify", {"Content-Type": "multipart/form-data; boundary=abc"},
     b'--abc\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n\x89PNG', 400, "truncated"),
    ("/classify", {"Content-Type": "multipart/form-data; boundary=abc"}, b"--xyz\r\n\r\n--xyz--", 400, "boundary"),
    ("/denoise", {"Content-Type": "multipart/form-data"}, b"--x\r\n", 400, "boundary"),
    ("/segment", {}, b"\x89PNG", 415, "content-type"),
    # hostile JSON: nesting past the parser's depth, an integer past Python's digit limit, NaN
    ("/v2/models/classify/infer", JSON, b"[" * 100_000, 400, "nested"),
    ("/v2/models/classify/infer", JSON, b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [1'
     + b"1" * 5000 + b"]}]}", 400, "json"),
    ("/sample", JSON, b'{"n": NaN}', 400, "json"),
    ("/v2/models/classify/infer", JSON, json.dumps({"inputs": [{"name": "image", "datatype": "FP32",
                                                                 "shape": [1, 1, 28, 28], "data": [0.0] * 784}],
                                                     "outputs": [{"name": "probabilities", "parameters": "x"}]}),
     400, "parameters"),
    # declared shapes against the contract before any data is decoded
    ("/v2/models/classify/infer", *oip_binary(fp32_input([100000, 1, 28, 28], 16), b"\0" * 16)[::-1], 413, "image"),
    ("/v2/models/classify/infer", JSON, json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1],
                                                                 "data": [0]}]}), 400, "unknown input"),
    ("/v2/models/classify/infer", JSON, json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                                                 "data": ["a"]}]}), 400, "datatype"),
    ("/v2/models/nope/infer", JSON, b"{}", 404, "nope"),
    # only the allowed image formats reach a decoder
    ("/classify", {"Content-Type": "image/tiff"}, b"II*\x00" + b"\0" * 64, 415, "png"),
]


@pytest.mark.parametrize("path, headers, body, status, word", MALFORMED)
def test_malformed_request_is_a_named_4xx(server, path, headers, body, status, word):
    r = requests.post(f"{server.url}{path}", headers=headers, data=body, timeout=30)
    assert r.status_code == status, r.text
    assert word in r.text.lower() and "Traceback" not in r.text
    assert "error" in r.json()
    still_serving(server.url)


def test_json_route_body_limit_is_far_below_the_ceiling(server):
    answer = head_only(server.url, "/generate", b"Content-Type: application/json\r\nContent-Length: 2000000\r\n",
                       b"the limit is")
    assert answer.startswith(b"HTTP/1.1 413") and b"the limit is 1048576" in answer, answer[:300]
    # An unknown model is refused before its (large) body is read.
    answer = head_only(server.url, "/v2/models/nope/infer", b"Content-Type: application/json\r\n"
                       b"Content-Length: 45000000\r\n", b"nope")
    assert answer.startswith(b"HTTP/1.1 404"), answer[:300]
    still_serving(server.url)


def head_only(url: str, path: str, headers: bytes, until: bytes) -> bytes:
    """A POST whose headers declare a body that is never sent: what the server answers at once."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\n".encode() + headers + b"\r\n")
        answer = b""
        while until not in answer:  # head and body may come in separate reads
            chunk = conn.recv(4096)
            if not chunk:
                break
            answer += chunk
    return answer


def test_model_control_needs_the_admin_key_and_json(server):
    path = f"{server.url}/v2/repository/models/classify/unload"
    assert requests.post(path, timeout=30).status_code == 401  # no key
    assert requests.post(path, headers={"Authorization": "Bearer wrong"}, json={}, timeout=30).status_code == 401
    form = requests.post(path, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, data={"a": "b"}, timeout=30)
    assert form.status_code == 415 and "application/json" in form.json()["error"]  # no cross-site form can send it
    assert classify_once(server.url)[0] == 200  # nothing was unloaded


def test_body_over_the_limit_is_refused_before_it_is_sent(server):
    # and not one byte of the gigabyte
    answer = head_only(server.url, "/classify", b"Content-Type: image/png\r\nContent-Length: 1000000000\r\n",
                       b"the limit is")
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"the limit is" in answer
    still_serving(server.url)


def test_grpc_message_over_the_limit_is_refused(server):
    client = tgrpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    x = tgrpc.InferInput("image", [1, 1, 4100, 4100], "FP32")  # 67 MB, over the 64 MB message limit
    x.set_data_from_numpy(np.zeros((1, 1, 4100, 4100), np.float32))
    with pytest.raises(InferenceServerException) as info:
        client.infer("classify", [x])
    assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert client.is_server_ready()
    client.close()


def test_grpc_fuzz_gets_no_server_error(server):
    report = grpc_fuzz(server.grpc_port, 400, seed=7, models=["classify", "segment", "denoise", "sample", "generate"])
    assert sum(report.requests["gRPC ModelInfer"].values()) == 400
    assert report.server_errors == []
    still_serving(server.url)


def test_schemathesis_finds_no_server_error(server, tmp_path):
    report = schemathesis_run(server.url, examples=12, seed=1, workdir=tmp_path)
    assert report.server_errors == []
    for route in ("POST /classify", "POST /segment", "POST /denoise", "POST /sample", "POST /generate",
                  "POST /generate_stream", "POST /v1/completions", "GET /v1/models", "POST /v2/models/{model}/infer"):
        assert sum(report.requests.get(route, {}).values()) > 0, (route, report.table())
    still_serving(server.url)


# ---- model control ------------------------------------------------------------------------------

def classify_once(url: str) -> tuple[int, str | None]:
    r = requests.post(f"{url}/classify", files={"image": ("d.png", digit_png()[0], "image/png")}, timeout=60)
    return r.status_code, (r.json().get("model") if r.status_code == 200 else r.text)


def test_unload_and_load_over_http_and_grpc(server):
    index = requests.post(f"{server.url}/v2/repository/index", timeout=30).json()
    defaults = {"classify", "segment", "generate", "denoise", "sample"}
    assert {e["name"] for e in index if e["state"] == "READY"} == (defaults | {n + SECOND for n in defaults}
                                                                   | set(RECURRENT) | {"-".join(VARIANT)})
    r = control(server.url, "generate", "unload", timeout=120)
    assert r.status_code == 200 and r.json()["workers"] >= 1, r.text
    refused = requests.post(f"{server.url}/generate", json={"prompt": "The", "max_new_tokens": 2}, timeout=30)
    assert refused.status_code == 503 and "unloaded" in refused.json()["error"]
    assert requests.get(f"{server.url}/readyz", timeout=10).status_code == 200  # unloaded on purpose: still ready
    client = tgrpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    assert not client.is_model_ready("generate")
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    client.load_model("generate", headers=admin)  # the gRPC repository extension
    assert client.is_model_ready("generate")
    states = {m.name: m.state for m in client.get_model_repository_index().models if m.state == "READY"}
    assert "generate" in states
    with pytest.raises(InferenceServerException) as info:
        client.load_model("nope", headers=admin)
    assert info.value.status() == "StatusCode.NOT_FOUND"
    client.close()
    still_serving(server.url)


def test_hot_reload_of_a_new_export_under_light_load(server, built_models):
    import bentoml

    from export.onnx_export import export_onnx, save_to_store
    from training.registry import FAMILIES

    status, before = classify_once(server.url)
    assert status == 200
    seen: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            seen.append(classify_once(server.url))

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        time.sleep(0.5)
        new_tag = save_to_store(export_onnx(FAMILIES["classify"]), FAMILIES["classify"])
        r = control(server.url, "classify", "load")
        assert r.status_code == 200, r.text
        assert f"classify:{r.json()['version']}" == new_tag and r.json()["workers"] == len(worker_pids(server))
        after = [classify_once(server.url) for _ in range(8)]
        time.sleep(0.3)
    finally:
        stop.set()
        worker.join()
    assert {s for s, _ in seen} == {200}, [x for x in seen if x[0] != 200][:3]  # nothing failed in the switch
    assert {m for _, m in seen} <= {before, new_tag}
    assert after == [(200, new_tag)] * 8  # every worker serves the new version
    # Back to the session's version: without the new export, "the newest" is the old one again.
    bentoml.models.delete(new_tag)
    r = control(server.url, "classify", "load")
    assert r.status_code == 200 and f"classify:{r.json()['version']}" == before
    assert classify_once(server.url) == (200, before)


def test_killed_worker_is_replaced_and_nothing_hangs(server):
    workers = worker_pids(server)
    assert len(workers) >= 2
    outcomes: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            try:
                outcomes.append(str(classify_once(server.url)[0]))
            except requests.Timeout:
                outcomes.append("timeout")
            except requests.ConnectionError:
                outcomes.append("connection closed")  # the killed worker's own connections

    threads = [threading.Thread(target=traffic) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1)
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            now = worker_pids(server)
            if len(now) == len(workers) and workers[0] not in now:
                break
            time.sleep(0.5)
        replaced = worker_pids(server)
        assert len(replaced) == len(workers) and workers[0] not in replaced, replaced
        while time.monotonic() < deadline and requests.get(f"{server.url}/readyz", timeout=10).status_code != 200:
            time.sleep(0.5)
        time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert "timeout" not in outcomes
    assert outcomes.count("200") > 10
    assert [classify_once(server.url)[0] for _ in range(20)] == [200] * 20


# ---- a server with a corrupt model in its store, one worker and small queues --------------------

@pytest.fixture(scope="module")
def faulty(built_models, tmp_path_factory):
    """A copy of the test store whose segment model file is cut short."""
    store = tmp_path_factory.mktemp("faulty") / "bentoml"
    shutil.copytree(os.environ["BENTOML_HOME"], store)
    folder = store / "models" / "segment" / (store / "models" / "segment" / "latest").read_text().strip()
    good = (folder / "model.onnx").read_bytes()
    (folder / "model.onnx").write_bytes(good[:1000])
    server = start_suite({"BENTOML_HOME": str(store), "SUITE_WORKERS": "1", "SUITE_INTRA_OP_THREADS": "1",
                          "SUITE_MODEL_LIMITS": "denoise.max_queue=4,denoise.max_queue_wait_ms=300", **MODEL_CONTROL},
                         store.parent / "serve.log", timeout=180, ready_path="/v2/health/live")
    server.segment_file, server.segment_bytes = folder / "model.onnx", good
    try:
        yield server
    finally:
        server.stop(grace=40)


def test_corrupt_model_is_named_not_ready_and_the_others_serve(faulty):
    probe = requests.get(f"http://127.0.0.1:{faulty.probe_port}/readyz", timeout=10)
    assert probe.status_code == 503 and "segment" in probe.json()["reason"] and "could not be loaded" in probe.json()["reason"]
    assert requests.get(f"{faulty.url}/readyz", timeout=10).status_code == 503
    refused = requests.post(f"{faulty.url}/segment", files={"image": ("d.png", digit_png()[0], "image/png")}, timeout=30)
    assert refused.status_code == 503 and "segment" in refused.json()["error"] and "Traceback" not in refused.text
    assert classify_once(faulty.url)[0] == 200
    assert "model segment" in faulty.log() and "could not be loaded" in faulty.log()
    # Repaired in the store, then loaded without a restart.
    faulty.segment_file.write_bytes(faulty.segment_bytes)
    assert control(faulty.url, "segment", "load", timeout=120).status_code == 200
    assert _ready_soon(faulty)


def _ready_soon(server) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if requests.get(f"http://127.0.0.1:{server.probe_port}/readyz", timeout=10).status_code == 200:
            return True
        time.sleep(0.25)
    return False


def denoise_request(url: str, image: bytes) -> tuple[int, float, str | None]:
    started = time.perf_counter()
    r = requests.post(f"{url}/denoise", data=image, headers={"Content-Type": "image/png"}, timeout=120)
    return r.status_code, time.perf_counter() - started, r.headers.get("Retry-After")


def test_overload_burst_gets_fast_503s_and_an_instant_readyz(faulty):
    image = png_bytes((np.random.default_rng(0).random((384, 384)) * 255).astype(np.uint8))
    probes: list[float] = []
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            started = time.perf_counter()
            requests.get(f"http://127.0.0.1:{faulty.probe_port}/readyz", timeout=10)
            probes.append(time.perf_counter() - started)
            time.sleep(0.02)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            results = list(pool.map(lambda _: denoise_request(faulty.url, image), range(64)))
    finally:
        done.set()
        prober.join()
    served = sorted(t for s, t, _ in results if s == 200)
    refused = sorted(t for s, t, _ in results if s == 503)
    assert {s for s, _, _ in results} <= {200, 503}
    assert served and refused, results
    assert all(retry for s, _, retry in results if s == 503)  # Retry-After on every refusal
    assert np.median(refused) < np.median(served)  # refused on arrival, not after waiting
    assert max(probes) < 1.0, sorted(probes)[-5:]  # the figure (p99) is the overload benchmark's
    assert denoise_request(faulty.url, image)[0] == 200  # and it serves again once the burst is over


def test_sigterm_drains_requests_in_flight(faulty):
    image = png_bytes((np.random.default_rng(1).random((1024, 1024)) * 255).astype(np.uint8))
    finished: list[tuple[int, float]] = []

    def one() -> None:
        status, _, _ = denoise_request(faulty.url, image)
        finished.append((status, time.monotonic()))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.4)  # every request admitted (queued or running) or refused on arrival
    signalled = time.monotonic()
    os.kill(faulty.process.pid, signal.SIGTERM)  # what Kubernetes does: the main process only
    for t in threads:
        t.join(60)
    faulty.process.wait(timeout=45)  # BentoML's arbiter kills what is left after 30 s
    # A 1024x1024 image is 4 tiles, and this server's denoise queue holds 4, so a request arriving
    # while another's tiles are queued may be refused on arrival (503, before the signal): that is
    # admission, not the drain. Every request still in flight when the signal came is answered.
    assert len(finished) == 4 and {s for s, _ in finished} <= {200, 503}, finished
    assert all(s == 200 for s, t in finished if t > signalled), finished
    assert all(t < signalled for s, t in finished if s == 503), finished
    assert any(t > signalled for _, t in finished), finished  # some were still running when it came
