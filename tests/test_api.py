"""The five native APIs over real HTTP against a real `bentoml serve`, asserting content; every bad
input gets a 4xx naming the field and the server keeps serving; a bounded locust run; bentoml build."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from loadtest.payloads import digit_png, photo_png, png_bytes, scene_png
from loadtest.servers import free_port
from tests.conftest import RECURRENT, SECOND, VARIANT, REPO, build_bento, scrape


def post_image(server, path: str, png: bytes, **fields) -> requests.Response:
    return requests.post(f"{server.url}{path}", files={"image": ("upload.png", png, "image/png")},
                         data={k: str(v) for k, v in fields.items()}, timeout=60)


def decode(response: requests.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(response.content)))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0 ** 2 / mse)


def test_classify_heldout_digits(server):
    from training.data import split_indices

    _, heldout = split_indices(1797, 0.2, seed=0)  # the classifier's own held-out split
    right = 0
    for index in heldout[:10]:
        png, label = digit_png(int(index))
        body = post_image(server, "/classify", png, top_k=3).json()
        assert body["model"].startswith("classify:")
        assert len(body["predictions"]) == 3
        probs = [p["probability"] for p in body["predictions"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
        right += body["predictions"][0]["class_id"] == label and body["predictions"][0]["label"] == str(label)
    assert right >= 8, f"only {right}/10 held-out digits right"


def test_classify_ood_score(server):
    """/classify says how unlike the training digits an input is: held-out digits score lower than
    crops of a photograph, on average, and both lie in [0, 1]."""
    from training.data import split_indices

    _, heldout = split_indices(1797, 0.2, seed=0)
    digits = [post_image(server, "/classify", digit_png(int(i))[0]).json() for i in heldout[:12]]
    photo = np.asarray(Image.open(io.BytesIO(photo_png("coins", size=256)[0])))
    crops = [post_image(server, "/classify", png_bytes(photo[y:y + 48, x:x + 48])).json()
             for y in (0, 100, 200) for x in (0, 100, 200)]
    for body in digits + crops:
        assert 0 <= body["ood_score"] <= 1 and body["reconstruction_error"] >= 0, body
    mean = lambda bodies: sum(b["ood_score"] for b in bodies) / len(bodies)  # noqa: E731
    assert mean(digits) < mean(crops), (mean(digits), mean(crops))


def test_classify_accepts_rgb_jpeg_dark_on_light(server):
    png, label = digit_png(int(1750))
    gray = 255 - np.asarray(Image.open(io.BytesIO(png)))  # ink on paper, as people draw digits
    buffer = io.BytesIO()
    Image.fromarray(np.stack([gray] * 3, -1)).resize((150, 150)).save(buffer, format="JPEG")
    response = post_image(server, "/classify", buffer.getvalue())
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["class_id"] == label


def test_segment_mask_overlaps_truth(server):
    png, truth = scene_png()
    mask = decode(post_image(server, "/segment", png))
    assert mask.shape == truth.shape and mask.dtype == np.uint8
    fg, fg_truth = mask > 0, truth > 0
    iou = (fg & fg_truth).sum() / max(1, (fg | fg_truth).sum())
    assert iou > 0.4, f"foreground IoU {iou:.2f}"
    # any size in, same size out
    big = Image.open(io.BytesIO(png)).resize((150, 100))
    assert decode(post_image(server, "/segment", png_bytes(np.asarray(big)))).shape == (100, 150)


@pytest.mark.parametrize("sigma", [25, None])
def test_denoise_raises_psnr(server, sigma):
    noisy_png, clean = photo_png()
    noisy = np.asarray(Image.open(io.BytesIO(noisy_png)))
    fields = {} if sigma is None else {"sigma": sigma}
    denoised = decode(post_image(server, "/denoise", noisy_png, **fields))
    assert denoised.shape == clean.shape
    assert psnr(denoised, clean) > psnr(noisy, clean) + 0.5


def test_denoise_rgb_keeps_size_and_mode(server):
    png, _ = scene_png()
    out = decode(post_image(server, "/denoise", png, sigma=10))
    assert out.shape == (64, 64, 3)


def test_sample_count_and_seed(server):
    def sample(**body):
        r = requests.post(f"{server.url}/sample", json=body, timeout=60)
        return decode(r), r.content

    grid, raw = sample(n=5, seed=11)
    assert grid.shape == (28, 5 * 28 + 4 * 2)  # one row of five 28x28 samples, 2-pixel gutters
    assert sample(n=5, seed=11)[1] == raw
    assert sample(n=5, seed=12)[1] != raw
    assert sample(n=16, seed=1, class_id=3)[0].shape == (2 * 28 + 2, 8 * 28 + 7 * 2)


def generate(server, **body):
    r = requests.post(f"{server.url}/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_generate_limits_and_seed(server):
    first = generate(server, prompt="The assert statement", max_new_tokens=12, seed=5, temperature=0.9, top_k=50)
    assert first["usage"]["completion_tokens"] <= 12 and first["usage"]["prompt_tokens"] > 0
    assert first["finish_reason"] in ("length", "stop")
    assert first["text"]
    again = generate(server, prompt="The assert statement", max_new_tokens=12, seed=5, temperature=0.9, top_k=50)
    assert again["text"] == first["text"]
    top_p = generate(server, prompt="x", max_new_tokens=3, seed=1, top_p=0.5)
    assert top_p["usage"]["completion_tokens"] <= 3


def test_generate_stop_string(server):
    base = generate(server, prompt="The", max_new_tokens=30, seed=9)
    if len(base["text"]) < 4:
        pytest.skip("too little text to cut")
    stop = base["text"][2:4]
    cut = generate(server, prompt="The", max_new_tokens=30, seed=9, stop=[stop])
    assert cut["finish_reason"] == "stop" and stop not in cut["text"]
    assert base["text"].startswith(cut["text"])


def test_generate_stream_joins_to_text(server):
    body = {"prompt": "Exceptions are", "max_new_tokens": 48, "seed": 21, "ignore_eos": True}
    whole = generate(server, **body)
    r = requests.post(f"{server.url}/generate_stream", json=body, stream=True, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    # How many pieces depends on how soon the reader wakes (a tiny model may finish first), so only
    # their shape is asserted here; one chunk per token is test_textengine's lock-step test.
    assert all("finish_reason" not in p for p in payloads[:-1])
    assert "".join(p["text"] for p in payloads) == whole["text"]
    assert payloads[-1]["finish_reason"] == whole["finish_reason"]
    assert payloads[-1]["usage"] == whole["usage"]


def test_models_endpoint(server, built_models, second_models, variant_models):
    body = requests.post(f"{server.url}/models", json={}, timeout=30).json()
    by_name = {m["name"]: m for m in body}
    # the defaults and every other stored model, export variants included
    assert set(by_name) == set(built_models) | set(second_models) | set(variant_models)
    (variant_name,) = variant_models
    variant = by_name[variant_name]
    assert variant["variant"] == VARIANT[1] and variant["variant_of"] == VARIANT[0] and variant["gate"]["passed"]
    assert by_name[VARIANT[0]]["answered_by"] == variant_name and by_name["classify"]["answered_by"] == "classify"
    assert by_name["classify"]["variant"] == "fp32"
    for name, built in {**built_models, **second_models}.items():
        m = by_name[name]
        assert f"{name}:{m['version']}" == built.tag
        assert m["parity_max_abs_diff"] == pytest.approx(built.parity)
        assert m["metrics"] and m["contract"]["inputs"] and m["task"] and m["ready"]
        assert m["family"] == built.family and m["profile"] == "quick"


def test_model_choice_on_every_api(server, second_models):
    """Each native route and the OpenAI route serve the model named in the request (the task's
    default otherwise), and say which one answered."""
    import openai

    digit, _ = digit_png(3)
    scene, _ = scene_png()
    photo, _ = photo_png(size=64)
    for path, png, fields in (("/segment", scene, {}), ("/denoise", photo, {"sigma": 25})):
        family = path.strip("/")
        default = post_image(server, path, png, **fields)
        chosen = post_image(server, path, png, model=family + SECOND, **fields)
        assert default.headers["x-model"].startswith(f"{family}:")
        assert chosen.status_code == 200 and chosen.headers["x-model"].startswith(f"{family}{SECOND}:"), chosen.text
    body = post_image(server, "/classify", digit, model="classify" + SECOND).json()
    assert body["model"].startswith("classify" + SECOND + ":")
    r = requests.post(f"{server.url}/sample", json={"n": 2, "seed": 1, "model": "sample" + SECOND}, timeout=60)
    assert r.status_code == 200 and r.headers["x-model"].startswith("sample" + SECOND + ":")
    # /sample is configured to its fp16 variant, and says so; a version pins the fp32 model
    routed = requests.post(f"{server.url}/sample", json={"n": 2, "seed": 1}, timeout=60)
    assert routed.status_code == 200 and routed.headers["x-model"].startswith("sample-fp16:")
    fp32_version = requests.post(f"{server.url}/models", json={}, timeout=30).json()
    version = next(m["version"] for m in fp32_version if m["name"] == "sample")
    pinned = requests.post(f"{server.url}/sample", json={"n": 2, "seed": 1, "model": f"sample:{version}"}, timeout=60)
    assert pinned.status_code == 200 and pinned.headers["x-model"] == f"sample:{version}"
    assert r.content != requests.post(f"{server.url}/sample", json={"n": 2, "seed": 1}, timeout=60).content
    text = {"prompt": "The ", "max_new_tokens": 4, "seed": 0, "model": "generate" + SECOND}
    assert requests.post(f"{server.url}/generate", json=text, timeout=60).json()["model"].startswith("generate" + SECOND)
    r = requests.post(f"{server.url}/generate_stream", json=text, timeout=60)
    assert r.status_code == 200 and r.headers["x-model"].startswith("generate" + SECOND + ":")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    assert {m.id for m in client.models.list()} == {"generate", "generate" + SECOND, *RECURRENT}
    done = client.completions.create(model="generate" + SECOND, prompt="The ", max_tokens=3, seed=0)
    assert done.model.startswith("generate" + SECOND)
    for name in RECURRENT:  # the LSTM and GRU language models, through the same routes
        body = requests.post(f"{server.url}/generate", json={**text, "model": name, "max_new_tokens": 8}, timeout=60).json()
        assert body["model"].startswith(name + ":") and body["usage"]["completion_tokens"] >= 1, body
        done = client.completions.create(model=name, prompt="The ", max_tokens=5, seed=0, temperature=0)
        assert done.model.startswith(name + ":") and done.usage.completion_tokens >= 1
    # a model of another task, and a model that is not served
    wrong = post_image(server, "/classify", digit, model="segment" + SECOND)
    assert wrong.status_code == 400 and wrong.json()["field"] == "model" and "segment" in wrong.json()["error"]
    missing = post_image(server, "/classify", digit, model="classify-nope")
    assert missing.status_code == 404 and missing.json()["field"] == "model"


BIG_PNG = png_bytes(np.zeros((4100, 4100), np.uint8))  # 16.8 M pixels, over the 16 M limit


@pytest.mark.parametrize("path, kwargs, status, field", [
    # not one of the allowed formats (PNG, JPEG, WebP, BMP by their magic bytes): 415 before any decoder runs
    ("/classify", {"files": {"image": ("x.png", b"definitely not an image", "image/png")}}, 415, "image"),
    ("/classify", {"files": {"image": ("x.png", b"", "image/png")}}, 400, "image"),
    ("/classify", {"data": {"top_k": "3"}}, 415, "image"),  # a urlencoded form cannot carry an image
    ("/classify", {"files": {"image": ("x.png", BIG_PNG, "image/png")}}, 413, "image"),
    ("/classify", {"files": {"image": ("x.png", digit_png()[0], "image/png")}, "data": {"top_k": "many"}}, 400, "top_k"),
    ("/segment", {"files": {"image": ("x.png", b"\x89PNG\r\n\x1a\nbroken", "image/png")}}, 400, "image"),
    ("/denoise", {"files": {"image": ("x.png", b"GIF89a", "image/gif")}}, 415, "image"),
    ("/denoise", {"files": {"image": ("x.png", digit_png()[0], "image/png")}, "data": {"sigma": "-3"}}, 400, "sigma"),
    ("/sample", {"json": {"n": 0}}, 400, "n"),
    ("/sample", {"json": {"n": 100000}}, 400, "n"),
    ("/sample", {"json": {"n": 2, "class_id": 42}}, 400, "class_id"),
    ("/sample", {"json": {"n": "several"}}, 400, "n"),
    ("/generate", {"json": {"prompt": "a", "max_new_tokens": 100000}}, 400, "max_new_tokens"),
    ("/generate", {"json": {"prompt": "a", "temperature": "hot"}}, 400, "temperature"),
    ("/generate", {"json": {"prompt": ["not", "a", "string"]}}, 400, "prompt"),
    ("/generate_stream", {"json": {"prompt": "a", "max_new_tokens": 0}}, 400, "max_new_tokens"),
])
def test_bad_input_is_a_named_client_error(server, path, kwargs, status, field):
    r = requests.post(f"{server.url}{path}", timeout=60, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert field in body["error"], body  # every error: {"error": ..., "field": ...}
    assert body.get("field") in (field, "content-type"), body
    # the server keeps serving
    assert requests.post(f"{server.url}/sample", json={"n": 1, "seed": 0}, timeout=60).status_code == 200


def locust_distributed(server, tmp_path, slo_file: Path, workers: int = 2, seconds: int = 12):
    """loadtest/profile.toml run as `make loadtest` runs it, but distributed: a master and
    ``workers`` worker processes on this machine, shorter and with the objectives of ``slo_file``."""
    locust = [sys.executable, "-m", "locust", "--config", str(REPO / "loadtest/profile.toml")]
    master = subprocess.Popen(
        locust + ["--master", "--expect-workers", str(workers), "--host", server.url, "-u", "6", "-r", "6",
                  "-t", f"{seconds}s", "--stop-timeout", "5", "--csv", str(tmp_path / "locust"),
                  "--html", str(tmp_path / "locust.html"), "--slo-file", str(slo_file), "--master-bind-port",
                  str(port := free_port())],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    helpers = [subprocess.Popen(locust + ["--worker", "--master-port", str(port)], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(workers)]
    try:
        output, _ = master.communicate(timeout=seconds + 90)
    finally:
        for helper in helpers:
            helper.wait(timeout=30)
    stats = (tmp_path / "locust_stats.csv").read_text().splitlines()
    rows = [dict(zip(stats[0].split(","), line.split(","))) for line in stats[1:]]
    return master.returncode, output, {r["Name"]: r for r in rows}


def test_locust_distributed_run_meets_objectives(server, tmp_path):
    slo = tmp_path / "slo.toml"  # objectives any healthy server meets (the real ones are sized for `make serve`)
    slo.write_text("".join(f'[tool.suite.slo."{name}"]\nmax_error_rate = 0\np99_ms = 20000\n\n'
                           for name in ("/classify", "/segment", "/generate", "/denoise", "/sample", "Aggregated")))
    code, output, by_name = locust_distributed(server, tmp_path, slo)
    assert code == 0, output[-3000:]
    assert "objectives: all met" in output and "MISSED" not in output, output[-3000:]
    for path in ("/classify", "/segment", "/generate", "/denoise", "/sample", "/v1/completions stream"):
        assert int(by_name[path]["Request Count"]) > 0, (path, output[-2000:])
    assert int(by_name["Aggregated"]["Failure Count"]) == 0, output[-3000:]
    assert (tmp_path / "locust.html").stat().st_size > 1000


def test_locust_run_fails_on_a_missed_objective_and_still_reports(server, tmp_path):
    slo = tmp_path / "slo.toml"
    slo.write_text('[tool.suite.slo."/classify"]\np99_ms = 0.001\n\n[tool.suite.slo."/nonexistent"]\nmin_rps = 1\n')
    code, output, by_name = locust_distributed(server, tmp_path, slo, workers=1, seconds=6)
    assert code == 1, output[-3000:]
    assert "MISSED /classify: p99" in output and "MISSED /nonexistent: no requests" in output, output[-3000:]
    assert int(by_name["/classify"]["Request Count"]) > 0 and (tmp_path / "locust.html").exists()


def test_bentoml_build_offline(built_models, tmp_path):
    import bentoml

    bento = bentoml.get(build_bento({**os.environ, "PIP_NO_INDEX": "1"}))
    assert {m.tag.name for m in bento.info.all_models} >= set(built_models)


def test_raw_image_body_and_model_header(server):
    png, label = digit_png(1720)
    r = requests.post(f"{server.url}/classify?top_k=2", data=png, headers={"Content-Type": "image/png"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["class_id"] == label and len(r.json()["predictions"]) == 2
    scene, _ = scene_png()
    r = requests.post(f"{server.url}/segment", data=scene, headers={"Content-Type": "image/png"}, timeout=60)
    assert r.status_code == 200 and r.headers["x-model"].startswith("segment:")
    r = requests.post(f"{server.url}/sample", json={"n": 2}, timeout=60)
    assert r.status_code == 200 and int(r.headers["x-seed"]) >= 0


def test_concurrent_requests_each_get_their_own_answer(server):
    """Requests stacked into shared batches still get their own rows back."""
    from concurrent.futures import ThreadPoolExecutor

    from training.data import split_indices

    _, heldout = split_indices(1797, 0.2, seed=0)
    digits = [digit_png(int(i)) for i in heldout[:48]]

    def classify(item):
        png, _ = item
        return requests.post(f"{server.url}/classify", data=png, headers={"Content-Type": "image/png"},
                             timeout=60).json()["predictions"][0]["class_id"]

    alone = [classify(d) for d in digits]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(classify, digits))
    assert together == alone
    assert sum(p == label for p, (_, label) in zip(together, digits)) >= 36


def test_metrics_per_model(server):
    """Each request moves its own model's series by exactly what it did: one answered, one refused."""
    before = scrape(server.url)
    assert requests.post(f"{server.url}/classify", data=digit_png()[0], headers={"Content-Type": "image/png"},
                         timeout=60).status_code == 200
    assert requests.post(f"{server.url}/classify", data=b"junk", headers={"Content-Type": "image/png"},
                         timeout=60).status_code == 415  # not an image of an allowed format
    after = scrape(server.url)

    def moved(series: str) -> float:
        return after.get(series, 0.0) - before.get(series, 0.0)

    assert moved('suite_requests_total{model="classify",protocol="native",status="200"}') == 1
    assert moved('suite_requests_total{model="classify",protocol="native",status="415"}') == 1
    assert moved('suite_requests_total{model="segment",protocol="native",status="200"}') == 0
    # The refused request never reached the model: one batch, one inference, holding one image.
    assert moved('suite_batch_size_count{model="classify"}') == 1
    assert moved('suite_batch_size_sum{model="classify"}') == 1
    assert moved('suite_inference_seconds_count{model="classify"}') == 1
    assert moved('suite_inference_seconds_sum{model="classify"}') > 0
    assert after['suite_queue_depth{model="classify"}'] == 0


@pytest.mark.parametrize("method, path, headers, body, status, field", [
    ("POST", "/classify", {"Content-Type": "multipart/form-data"}, b"--x\r\n", 400, "content-type"),  # no boundary
    ("POST", "/classify", {"Content-Type": "multipart/form-data; boundary=abc"}, b"--xyz\r\n\r\n--xyz--", 400, "body"),
    ("POST", "/classify", {"Content-Type": "text/plain"}, b"hello", 415, "content-type"),
    ("POST", "/generate", {"Content-Type": "application/json"}, b"{not json", 400, "body"),
    ("POST", "/generate", {"Content-Type": "application/json"}, b'{"prompt": "a", "max_tokens": 3}', 400, "max_tokens"),
    ("POST", "/sample", {"Content-Type": "text/plain"}, b"{}", 415, "content-type"),
    ("GET", "/classify", {}, b"", 405, None),
])
def test_malformed_requests_are_json_4xx(server, method, path, headers, body, status, field):
    r = requests.request(method, f"{server.url}{path}", headers=headers, data=body, timeout=30)
    assert r.status_code == status, r.text
    assert r.json().get("field") == field and "Traceback" not in r.text
    assert requests.post(f"{server.url}/sample", json={"n": 1, "seed": 0}, timeout=60).status_code == 200


def test_openapi_document_lists_every_route(server):
    doc = requests.get(f"{server.url}/docs.json", timeout=30).json()
    assert doc["openapi"].startswith("3.")
    for path in ("/classify", "/segment", "/denoise", "/sample", "/generate", "/generate_stream", "/models",
                 "/v2/models/{model}/infer", "/v1/completions", "/v1/models"):
        assert path in doc["paths"], path
    n = doc["paths"]["/sample"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]["n"]
    assert n["maximum"] == 64  # read from the served model's contract
