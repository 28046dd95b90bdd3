"""Operations beyond one pod, without a server and then on a real `bentoml serve` (two workers):

- canary and shadow rollouts (services/rollout.py): plans, measures, shared tallies; a worse
  candidate refused, an equal one promoted, splits by percentage and header, text compared token
  by token;
- payload logging and drift (services/payload_log.py): records, rotation shared by workers, a
  writer that never blocks, the OOD histogram and the PSI of predicted classes;
- OpenTelemetry spans (services/tracing.py): request -> queue -> batch -> session run, in memory
  through a real batcher, and exported over OTLP/HTTP by the server to a collector in the test."""

from __future__ import annotations

import asyncio
import json
import random
import re
import time

import numpy as np
import pytest
import requests

from loadtest.payloads import digit_png, png_bytes
from services.payload_log import (DriftMonitor, PayloadLog, RotatingLines, population_stability_index,
                                  summarize_tensors)
from services.rollout import (PSNR_CAP_DB, RolloutPlan, Rollouts, mean_iou, psnr_db, requested_arm, token_agreement,
                              top1_agreement)

# ---- without a server -------------------------------------------------------------------------------


def test_plans_parse_and_refuse_what_cannot_work():
    plan = RolloutPlan.parse("classify=classify-int8;split=10;shadow=25;promote_after=200;min_agreement=0.97")
    assert (plan.model, plan.candidate, plan.split, plan.shadow, plan.promote_after, plan.min_agreement) == \
        ("classify", "classify-int8", 10.0, 25.0, 200, 0.97)
    assert RolloutPlan.parse("classify=classify:v2;shadow=5").candidate_version == "v2"
    for bad, says in [("classify", "model=candidate"), ("classify=classify", "needs a version"),
                      ("classify=other:v2", "same model"), ("classify=x;split=120", "0..100"),
                      ("classify=x;speed=3", "options are"), ("classify=x;promote_after=10", "needs comparisons"),
                      ("Classify=x", "not a model name")]:
        with pytest.raises(ValueError, match=says):
            RolloutPlan.parse(bad)


def test_measures():
    scores = np.eye(4, dtype=np.float32)
    assert top1_agreement(scores, scores) == 1.0
    assert top1_agreement(scores, scores[[1, 0, 2, 3]]) == 0.5
    mask = np.array([[0, 0, 1, 1]])
    assert mean_iou(mask, mask, 3) == 1.0
    assert mean_iou(mask, np.array([[0, 1, 1, 1]]), 3) == pytest.approx((1 / 2 + 2 / 3) / 2)
    image = np.linspace(0, 1, 100, dtype=np.float32)
    assert psnr_db(image, image) == PSNR_CAP_DB
    assert psnr_db(image, image + 0.01) == pytest.approx(40.0, abs=0.01)  # mse 1e-4 over a range of 1
    assert token_agreement([1, 2, 3, 4], [1, 2, 9, 4, 5]) == 3 / 5
    assert token_agreement([], []) == 1.0


def test_split_shadow_and_header_choose_the_arm():
    plan = RolloutPlan.parse("m=c;split=20;shadow=50")
    rollouts = Rollouts([plan], rng=random.Random(0))
    arms = [rollouts.choose(rollouts.active("m")) for _ in range(10_000)]
    assert arms.count("candidate") / len(arms) == pytest.approx(0.2, abs=0.02)
    assert arms.count("shadow") / len(arms) == pytest.approx(0.8 * 0.5, abs=0.02)
    token = requested_arm.set("primary")
    try:
        assert {rollouts.choose(rollouts.active("m")) for _ in range(200)} == {"primary"}  # pinned: never shadowed
    finally:
        requested_arm.reset(token)


def test_workers_share_plans_and_tallies(tmp_path):
    """Two workers' objects over one folder: the configured plan is written once, a tally written by
    one counts in the other's figures, a decision by one is seen by the other, and a second
    decision on the same rollout is not written."""
    configured = [RolloutPlan.parse("m=c;shadow=100;promote_after=4")]
    first, second = Rollouts(configured, tmp_path), Rollouts(configured, tmp_path)
    assert first.plans == second.plans
    plan = first.active("m")
    for value in (0.5, 1.0):
        first.record(plan, "top1_agreement", value)
    for value in (1.0, 1.0):
        second.record(plan, "top1_agreement", value)
    first.sync()
    assert second.sync() == [second.active("m")]  # four comparisons over the two: due
    assert second.figures("m") == {"comparisons": 4, "mean": 0.875, "measure": "top1_agreement", "skipped": 0}
    refused = RolloutPlan(**{**plan.to_json(), "state": "refused"})
    assert second.set(refused, only_if_running_since=plan.started_at)
    assert not first.set(RolloutPlan(**{**plan.to_json(), "state": "promoted"}), only_if_running_since=plan.started_at)
    time.sleep(0.01)
    first.sync()
    assert first.active("m") is None and first.plans["m"].state == "refused"


def test_payload_file_rotates_under_two_writers_without_losing_a_line(tmp_path):
    path = tmp_path / "payloads.jsonl"
    writers = [RotatingLines(path, 4096, backups=50), RotatingLines(path, 4096, backups=50)]
    for i in range(400):
        writers[i % 2].write(json.dumps({"i": i, "pad": "x" * 40}).encode() + b"\n")
    for writer in writers:
        writer.close()
    files = sorted(tmp_path.glob("payloads.jsonl*"))
    assert len(files) > 3 and all(f.stat().st_size < 4096 + 200 for f in files)
    seen = sorted(json.loads(line)["i"] for f in files for line in f.read_text().splitlines())
    assert seen == list(range(400))  # every line whole, none lost or doubled


def test_payload_log_never_blocks_and_counts_what_it_drops(tmp_path, monkeypatch):
    import services.payload_log as payload_log

    monkeypatch.setattr(payload_log, "QUEUE_RECORDS", 10)
    log = PayloadLog(str(tmp_path / "p.jsonl"))
    log._thread = object()  # a writer that never runs: the queue fills
    started = time.perf_counter()
    for i in range(100):
        log.write({"i": i})
    assert time.perf_counter() - started < 0.5 and log.dropped == 90
    log._thread = None
    log.close()  # nothing started: nothing to wait for
    monkeypatch.undo()
    written = PayloadLog(str(tmp_path / "q.jsonl"))
    for i in range(50):
        written.write({"i": i})
    written.close()  # drains the queue before the writer stops
    assert [json.loads(line)["i"] for line in (tmp_path / "q.jsonl").read_text().splitlines()] == list(range(50))
    sampled = PayloadLog("stdout", sample=0.25, rng=random.Random(1))
    assert sum(sampled.sampled() for _ in range(4000)) == pytest.approx(1000, abs=100)
    assert not PayloadLog(None).sampled()


def test_summaries_keep_no_raw_payload_unless_asked():
    tensors = {"image": np.ones((1, 1, 4, 4), np.float32)}
    assert summarize_tensors(tensors, raw=False)["image"] == {"shape": [1, 1, 4, 4], "dtype": "float32",
                                                             "mean": 1.0, "std": 0.0}
    assert "raw" in summarize_tensors(tensors, raw=True)["image"]


def test_psi_and_drift_monitor():
    uniform = np.full(10, 0.1)
    assert population_stability_index(uniform, uniform) == 0.0
    assert population_stability_index(uniform, np.eye(10)[3]) > 2.0  # every answer one class: a large shift

    class Contract:
        extra = {"label_distribution": list(uniform)}

    seen = {}

    class Metrics:
        def class_psi(self, model, psi):
            seen["psi"] = psi

        def ood_score(self, model, score):
            seen.setdefault("ood", []).append(score)

    drift = DriftMonitor(Metrics(), window=500, minimum=100)
    rng = np.random.default_rng(0)
    for class_id in rng.integers(0, 10, 1000):
        drift.observe("m", Contract(), int(class_id), 0.5)
    assert drift.psi("m") < 0.05 and seen["psi"] < 0.05 and len(seen["ood"]) == 1000
    for _ in range(500):  # the window moves to one class
        drift.observe("m", Contract(), 3)
    assert drift.psi("m") > 2.0 and seen["psi"] > 2.0


def test_spans_request_queue_batch_session_run():
    """Three requests batched together: each has its queue span under its request span; one batch
    span under the first queue span, linked to all three; one session run span under the batch."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from services import tracing
    from services.batching import DynamicBatcher

    exporter = InMemorySpanExporter()
    tracing.configure(exporter=exporter, simple=True)
    try:
        async def main():
            batcher = DynamicBatcher("m:1", lambda feeds: {"y": feeds["x"] * 2}, max_batch_size=8,
                                     max_queue_delay_s=0.05)

            async def request(i):
                with tracing.request_span(f"POST /r{i}", {}, {"i": i}):
                    return await batcher.submit({"x": np.full((1, 2), i, np.float32)})

            answers = await asyncio.gather(*(request(i) for i in range(3)))
            await batcher.close()
            return answers

        answers = asyncio.run(main())
    finally:
        tracing.shutdown()
    assert [a["y"][0, 0] for a in answers] == [0, 2, 4]
    spans = exporter.get_finished_spans()
    by_name = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)
    requests_ = [span for span in spans if span.name.startswith("POST")]
    queues, (batch,), (run,) = by_name["queue"], by_name["batch"], by_name["session run"]
    assert len(requests_) == 3 and len(queues) == 3
    request_ids = {s.context.span_id for s in requests_}
    assert {q.parent.span_id for q in queues} == request_ids
    assert batch.parent.span_id in {q.context.span_id for q in queues}
    assert {link.context.span_id for link in batch.links} == {q.context.span_id for q in queues}
    assert batch.attributes["rows"] == 3 and batch.attributes["requests"] == 3
    assert run.parent.span_id == batch.context.span_id
    assert tracing.tracer() is None  # off again: the hot paths check this


# ---- a real server ------------------------------------------------------------------------------------

from tests.conftest import ADMIN, MODEL_CONTROL, _TMP  # noqa: E402

PAYLOADS = _TMP / "payloads" / "requests.jsonl"
ROLLOUT_MODELS = "classify,classify-seed1,sample,sample-seed1,sample-fp16,generate,generate-seed1"


class Collector:
    """An OTLP/HTTP trace receiver on a loopback port: what the server exports, decoded."""

    def __init__(self):
        import http.server
        import threading

        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        self.spans: list = []
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                message = ExportTraceServiceRequest.FromString(body)
                for resource in message.resource_spans:
                    for scope in resource.scope_spans:
                        collector.spans.extend(scope.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}/v1/traces"


@pytest.fixture(scope="module")
def collector():
    found = Collector()
    yield found
    found.server.shutdown()


@pytest.fixture(scope="module")
def rollout_server(built_models, second_models, variant_models, collector):
    from loadtest.servers import start_suite

    server = start_suite({"SUITE_WORKERS": "2", "SUITE_INTRA_OP_THREADS": "1", "SUITE_VARIANT": "fp32",
                          "SUITE_MODELS": ROLLOUT_MODELS, "SUITE_DEFAULT_MODELS": "false",
                          # a worse candidate, decided automatically after 12 comparisons over both workers
                          "SUITE_ROLLOUTS": "sample=sample-seed1;shadow=100;promote_after=12",
                          "SUITE_PAYLOAD_LOG": str(PAYLOADS), "SUITE_PAYLOAD_LOG_MAX_BYTES": "65536",
                          "SUITE_TRACING": "true", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": collector.endpoint,
                          "OTEL_BSP_SCHEDULE_DELAY": "200",
                          **MODEL_CONTROL}, _TMP / "serve-rollout.log", timeout=180)
    try:
        yield server
    finally:
        server.stop(grace=20)


def rollout(url: str, model: str, action: str = "", body: dict | None = None, method: str = "post"):
    path = f"{url}/v2/repository/models/{model}/rollout" + (f"/{action}" if action else "")
    if method == "get":
        return requests.get(path, headers=ADMIN, timeout=30)
    return requests.post(path, json=body or {}, headers=ADMIN, timeout=60)


def sample(url: str, seed: int, headers: dict | None = None) -> requests.Response:
    answer = requests.post(f"{url}/sample", json={"n": 4, "seed": seed}, headers=headers or {}, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer


def compared(url: str, model: str, at_least: int, send) -> dict:
    """Sends requests (``send(i)``) until the rollout's figures hold ``at_least`` comparisons: a
    rollout started by one worker reaches the other within its watch interval (0.5 s)."""
    for i in range(200):
        send(i)
        status = rollout(url, model, method="get").json()
        if status.get("figures", {}).get("comparisons", 0) >= at_least:
            return status
    raise AssertionError(f"fewer than {at_least} comparisons: {status}")


def wait_for(predicate, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError("timed out")


def test_start_up_logs_one_line_per_worker_naming_what_it_serves(rollout_server):
    """BentoML's own three start-up lines per worker are off (49 on 16 cores); the suite's one line
    per worker is what loadtest/bench_serving.py counts."""
    lines = rollout_server.log().splitlines()
    listening = sorted(found.group(1) for found in map(re.compile(r"\] (worker \d+ listening.*)$").search, lines)
                       if found)
    assert len(listening) == 2, lines
    for index, line in enumerate(listening, start=1):
        assert line.startswith(f"worker {index} listening (gRPC :{rollout_server.grpc_port}, "
                               f"probes :{rollout_server.probe_port}); models: "), line
        assert line.endswith(ROLLOUT_MODELS.replace(",", ", ")), line
    assert not [line for line in lines if "startup hook" in line or "Service model-suite initialized" in line]


def test_a_worse_candidate_is_refused_automatically_with_its_figures(rollout_server):
    url = rollout_server.url
    for seed in range(16):
        assert sample(url, seed).headers["x-model"].startswith("sample:")  # the primary answers every request
    status = wait_for(lambda: (s := rollout(url, "sample", method="get").json())["state"] != "running" and s)
    assert status["state"] == "refused", status
    verdict = status["verdict"]
    assert verdict["decision"] == "refused" and verdict["measure"] == "psnr_db"
    assert verdict["comparisons"] >= 12 and verdict["mean"] < verdict["threshold"] == 30.0
    assert sample(url, 99).headers["x-model"].startswith("sample:")  # refused: the primary keeps every request


def test_an_equal_candidate_is_promoted_and_a_worse_one_refused_on_call(rollout_server):
    url = rollout_server.url
    started = rollout(url, "sample", body={"candidate": "sample-seed1", "shadow": 100})
    assert started.status_code == 200 and started.json()["state"] == "running", started.text
    compared(url, "sample", 6, lambda i: sample(url, i))
    refused = rollout(url, "sample", "promote")
    assert refused.status_code == 409, refused.text
    assert refused.json()["field"] == "candidate" and refused.json()["details"]["mean"] < 30.0

    started = rollout(url, "sample", body={"candidate": "sample-fp16", "shadow": 100})
    assert started.status_code == 200, started.text
    compared(url, "sample", 8, lambda i: sample(url, i))
    promoted = rollout(url, "sample", "promote")
    assert promoted.status_code == 200, promoted.text
    body = promoted.json()
    assert body["state"] == "promoted" and body["verdict"]["mean"] >= 30.0, body
    # Every worker routes /sample to the promoted variant from now on.
    wait_for(lambda: all(sample(url, s).headers["x-model"].startswith("sample-fp16:") for s in range(6)))


def test_canary_split_and_header(rollout_server):
    url = rollout_server.url

    image, _ = digit_png()
    answer = rollout(url, "classify", body={"candidate": "classify-seed1", "split": 100})
    assert answer.status_code == 200, answer.text

    def classify(headers=None):
        reply = requests.post(f"{url}/classify", files={"image": ("d.png", image, "image/png")},
                              headers=headers or {}, timeout=30)
        assert reply.status_code == 200, reply.text
        return reply.json()["model"]

    wait_for(lambda: all(classify().startswith("classify-seed1:") for _ in range(4)), timeout=10)
    assert classify({"x-suite-rollout": "primary"}).startswith("classify:")
    assert rollout(url, "classify", "stop").json()["state"] == "stopped"
    wait_for(lambda: all(classify().startswith("classify:") for _ in range(4)), timeout=10)
    assert rollout(url, "classify", "stop").status_code == 404  # nothing running now
    bad = rollout(url, "classify", body={"candidate": "sample"})
    assert bad.status_code == 400 and "serves" in bad.json()["error"]
    assert rollout(url, "classify", body={"candidate": "nope"}).status_code == 404
    assert rollout(url, "classify", body={"candidate": "classify-seed1", "split": 300}).status_code == 400


def test_text_generations_are_compared_token_by_token(rollout_server):
    url = rollout_server.url
    answer = rollout(url, "generate", body={"candidate": "generate-seed1", "shadow": 100})
    assert answer.status_code == 200, answer.text

    def generate(seed: int) -> None:
        reply = requests.post(f"{url}/generate", json={"prompt": "ROMEO:", "max_new_tokens": 12, "seed": seed},
                              timeout=60)
        assert reply.status_code == 200 and reply.json()["model"].startswith("generate:"), reply.text
        time.sleep(0.2)  # the candidate's generation finishes after the primary's answer

    figures = compared(url, "generate", 4, generate)["figures"]
    assert figures["measure"] == "token_agreement" and 0 <= figures["mean"] <= 1
    metrics = requests.get(f"{url}/metrics", timeout=10).text
    count = re.search(r'suite_shadow_measure_count\{candidate="generate-seed1",measure="token_agreement",'
                      r'model="generate"\} (\S+)', metrics)
    assert count and float(count.group(1)) >= 4
    assert re.search(r'suite_rollout_requests_total\{arm="shadow",model="generate"\} [1-9]', metrics)


def test_payload_records_and_drift_metrics(rollout_server):
    """Every request recorded (sampling 1.0) with a summary and no raw payload; the file rotates at
    its size; one digit sent over and over shows as drift in the PSI; noise shows in the OOD
    histogram's top bucket."""
    from concurrent.futures import ThreadPoolExecutor

    url = rollout_server.url
    digit, _ = digit_png()
    noise = png_bytes((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8))

    def classify(image):
        reply = requests.post(f"{url}/classify", files={"image": ("d.png", image, "image/png")}, timeout=30)
        assert reply.status_code == 200, reply.text
        return reply.json()

    with ThreadPoolExecutor(4) as pool:  # more than each worker's 200-answer minimum for a PSI
        answers = list(pool.map(classify, [digit] * 600 + [noise] * 20))
    assert answers[-1]["ood_score"] > 0.9
    metrics = wait_for(lambda: (m := requests.get(f"{url}/metrics", timeout=10).text) and
                       'suite_class_psi{model="classify"}' in m and m)
    psi = float(re.search(r'suite_class_psi\{model="classify"\} (\S+)', metrics).group(1))
    assert psi > 1.0  # one class against the digits' ten
    below = float(re.search(r'suite_ood_score_bucket\{le="0.99",model="classify"\} (\S+)', metrics).group(1))
    total = float(re.search(r'suite_ood_score_count\{model="classify"\} (\S+)', metrics).group(1))
    assert total >= 620 and total - below >= 20  # the noise lies above every held-out digit

    def records():
        lines = [line for f in PAYLOADS.parent.glob("requests.jsonl*") for line in f.read_text().splitlines()]
        return [json.loads(line) for line in lines]

    found = wait_for(lambda: (r := [x for x in records() if x["route"] == "/classify"]) and len(r) >= 620 and r)
    assert len(list(PAYLOADS.parent.glob("requests.jsonl.*"))) >= 1  # rotated at 64 KiB
    one = found[-1]
    assert one["model"] == "classify" and one["variant"] == "fp32" and one["latency_ms"] > 0
    assert one["input"]["image"]["format"] == "png" and "raw" not in one["input"]["image"]
    assert one["output"]["top"]["label"] and 0 <= one["ood_score"] <= 1



def test_the_server_exports_spans_that_continue_the_callers_trace(rollout_server, collector):
    url = rollout_server.url
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    image, _ = digit_png()
    reply = requests.post(f"{url}/classify", files={"image": ("d.png", image, "image/png")},
                          headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01", "x-suite-rollout": "primary"},
                          timeout=30)
    assert reply.status_code == 200, reply.text
    mine = wait_for(lambda: (found := [s for s in collector.spans if s.trace_id.hex() == trace_id])
                    and {"POST /classify", "queue", "batch", "session run"} <= {s.name for s in found} and found)
    spans = {s.name: s for s in mine}
    request = spans["POST /classify"]
    assert request.parent_span_id.hex() == "00f067aa0ba902b7"  # the caller's span
    assert spans["queue"].parent_span_id == request.span_id
    assert spans["batch"].parent_span_id == spans["queue"].span_id
    assert spans["session run"].parent_span_id == spans["batch"].span_id
    attributes = {a.key: a.value for a in request.attributes}
    assert attributes["model"].string_value == "classify" and attributes["http.response.status_code"].int_value == 200
