"""Optional access control on a real `bentoml serve` started with SUITE_API_KEY: every route but
health and metrics needs ``Authorization: Bearer <key>`` over HTTP (native, OIP REST, OpenAI) and
the same metadata over gRPC; a missing or wrong key is 401 / UNAUTHENTICATED naming the header."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import openai
import pytest
import requests
import tritonclient.grpc as tgrpc
from tritonclient.utils import InferenceServerException

from loadtest.payloads import digit_png
from loadtest.servers import start_suite

KEY = "test-key-7f3a"


@pytest.fixture(scope="module")
def keyed(built_models):
    settings = {"SUITE_INTRA_OP_THREADS": "1", "SUITE_WORKERS": "1", "SUITE_MODELS": "classify,generate",
                "SUITE_API_KEY": KEY, "SUITE_CORS_ORIGINS": "https://app.example.com", "SUITE_LOG_LEVEL": "info"}
    server = start_suite(settings, Path(tempfile.mkdtemp(prefix="keyed-")) / "serve.log", timeout=180)
    try:
        yield server
    finally:
        server.stop(grace=20)


def test_http_routes_need_the_key(keyed):
    png = digit_png()[0]
    classify = lambda headers: requests.post(f"{keyed.url}/classify", data=png, timeout=60,  # noqa: E731
                                             headers={"Content-Type": "image/png", **headers})
    missing = classify({})
    assert missing.status_code == 401 and missing.json()["field"] == "authorization"
    assert missing.headers["www-authenticate"] == "Bearer"
    assert classify({"Authorization": "Bearer wrong"}).status_code == 401
    assert classify({"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert requests.get(f"{keyed.url}/v2/models/classify", timeout=30).status_code == 401
    assert requests.get(f"{keyed.url}/docs.json", timeout=30).status_code == 401
    for public in ("/v2/health/live", "/v2/health/ready", "/metrics", "/readyz", "/livez"):
        assert requests.get(f"{keyed.url}{public}", timeout=30).status_code == 200, public


def test_model_control_is_off_by_default(keyed):
    """Like Triton's --model-control-mode=none: load and unload answer 403 whatever the key, and
    the inference key never controls models."""
    for headers in ({}, {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}):
        r = requests.post(f"{keyed.url}/v2/repository/models/classify/unload", headers=headers, timeout=30)
        assert r.status_code == 403 and "model_control" in r.json()["error"], r.text
    client = tgrpc.InferenceServerClient(f"127.0.0.1:{keyed.grpc_port}")
    try:
        with pytest.raises(InferenceServerException) as refused:
            client.unload_model("classify", headers={"authorization": f"Bearer {KEY}"})
        assert "PERMISSION_DENIED" in refused.value.status()
    finally:
        client.close()
    assert classify_ok(keyed)


def classify_ok(server) -> bool:
    r = requests.post(f"{server.url}/classify", data=digit_png()[0], timeout=60,
                      headers={"Content-Type": "image/png", "Authorization": f"Bearer {KEY}"})
    return r.status_code == 200


def test_openai_client_sends_its_api_key(keyed):
    good = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=KEY, max_retries=0, timeout=60)
    assert good.completions.create(model="generate", prompt="The", max_tokens=3).usage.completion_tokens >= 1
    bad = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as refused:
        bad.models.list()
    assert refused.value.body["code"] == "invalid_api_key"


def test_grpc_needs_the_key_except_health(keyed):
    client = tgrpc.InferenceServerClient(f"127.0.0.1:{keyed.grpc_port}")
    try:
        assert client.is_server_live() and client.is_server_ready()
        image = tgrpc.InferInput("image", [1, 1, 28, 28], "FP32")
        image.set_data_from_numpy(np.zeros((1, 1, 28, 28), np.float32))
        with pytest.raises(InferenceServerException) as refused:
            client.infer("classify", [image])
        assert "UNAUTHENTICATED" in refused.value.status() and "authorization" in refused.value.message()
        result = client.infer("classify", [image], headers={"authorization": f"Bearer {KEY}"})
        assert result.as_numpy("probabilities").shape == (1, 10)
    finally:
        client.close()


def test_grpc_health_protocol_answers_without_the_key(keyed):
    """grpc.health.v1 (what a Kubernetes gRPC probe calls): SERVING for the server and the inference
    service, NOT_FOUND for another service name, Watch opening with the status; no key needed."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{keyed.grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as unknown:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


def test_cors_for_configured_origins_only(keyed, server):
    """With cors_origins set, a browser's preflight is answered without the key (browsers send
    none) and answers carry the allowed origin; another origin's preflight is refused. Off by
    default: the default server sends no CORS headers."""
    origin = "https://app.example.com"
    preflight = requests.options(f"{keyed.url}/classify", timeout=30, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == origin
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    assert preflight.headers["access-control-max-age"] == "600"
    other = requests.options(f"{keyed.url}/classify", timeout=30, headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    answer = requests.post(f"{keyed.url}/classify", data=digit_png()[0], timeout=60,
                           headers={"Content-Type": "image/png", "Origin": origin, "Authorization": f"Bearer {KEY}"})
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == origin
    plain = requests.get(f"{server.url}/models", timeout=30, headers={"Origin": origin})
    assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers


def test_log_level_info_shows_the_suites_own_log(keyed):
    """SUITE_LOG_LEVEL=info lifts the suite's INFO lines (hidden by default below BentoML's WARNING
    root): each model's load names the stored version."""
    log = keyed.log()
    for model in ("classify", "generate"):
        assert f"loaded {model}:" in log, log[-3000:]

