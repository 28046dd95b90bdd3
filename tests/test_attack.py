"""The attack suite (loadtest/attack.py) against a real `bentoml serve` started here as the pod runs
it (two workers, the 1536Mi memory limit, a 2 s header timeout, model control off), one test per
attack class at the --quick sizes: the expected statuses and named JSON errors, the process tree's
peak RSS and its recovery, the probes throughout, /classify after. Plus the attack's own payload
builders, without a server."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from loadtest.attack import (ATTACKS, SETTINGS, Goals, bytes_tensor_json, grpc_flood_request, outcome_details,
                             palette_png, process_tree, resting_rss, run_attack, table_row, tree_rss)
from loadtest.servers import start_suite

# The script's goal is a probe p99 under 50 ms on a quiet machine; CI machines are noisy (other jobs
# share the cores), so here a probe must answer within 250 ms at p99. Failures stay at 0.
TEST_GOALS = Goals(probe_p99_ms=250.0)
QUICK_MODELS = "classify,segment,denoise,sample,generate"  # what the session's built_models makes


@pytest.fixture(scope="module")
def attacked(built_models):
    settings = {**SETTINGS, "SUITE_MODELS": QUICK_MODELS}
    server = start_suite(settings, Path(tempfile.mkdtemp(prefix="attack-")) / "serve.log", timeout=180)
    try:
        resting_rss(server.process.pid, idle_s=3.0)  # as the script does: the first attack starts from rest
        yield server
    finally:
        server.stop(grace=20)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack(attacked, name):
    outcome = run_attack(name, attacked, attacked.process.pid, TEST_GOALS, quick=True)
    assert outcome.result.statuses, f"{name} saw no answer at all\n{outcome_details(outcome)}"
    assert outcome.peak_rss is not None and outcome.probe_ms.get("live") and outcome.probe_ms.get("ready"), \
        "the monitor measured nothing"
    assert not outcome.missed, f"{table_row(outcome)}\n{outcome_details(outcome)}\n{attacked.log()[-3000:]}"


def test_grpc_flood_request_is_what_protobuf_would_serialize():
    from tritonclient.grpc import service_pb2 as pb

    built = pb.ModelInferRequest(model_name="classify")
    tensor = built.inputs.add()
    tensor.name, tensor.datatype = "image", "BYTES"
    tensor.shape.extend([5])
    tensor.contents.bytes_contents.extend([b""] * 5)
    assert grpc_flood_request(5) == built.SerializeToString()
    assert len(grpc_flood_request(1_000_000)) < 2_000_100  # two bytes an element: 60 MB at 30 M


def test_payloads_are_small_for_what_they_declare():
    import io
    import json

    from PIL import Image

    bomb = palette_png(4000)
    assert len(bomb) < 16 * 1024 and Image.open(io.BytesIO(bomb)).size == (4000, 4000)
    body = json.loads(bytes_tensor_json("text_input", 1000))
    assert body["inputs"][0]["shape"] == [1000] and body["inputs"][0]["data"] == ["a"] * 1000


def test_tree_rss_counts_the_children():
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert child.pid in process_tree(os.getpid())
        assert tree_rss(os.getpid()) > 0
    finally:
        child.kill()
        child.wait()
