"""Open Inference Protocol v2 over REST and gRPC with the real tritonclient clients against a real
`bentoml serve`: health, metadata from the contracts, all five models with answers equal to the
native APIs' for the same input, the binary tensor extension (FP32 and BYTES), and errors on both
transports after which the server keeps serving."""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import pytest
import requests
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from PIL import Image
from tritonclient.utils import InferenceServerException

from loadtest.payloads import digit_png, photo_png, scene_png


@pytest.fixture(scope="module")
def http(server):
    client = thttp.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=120)
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc(server):
    client = tgrpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    yield client
    client.close()


@pytest.fixture(scope="module")
def repo(server):
    """Contracts read from the same store the server serves (the conftest's private BENTOML_HOME)."""
    from services.config import ServingConfig
    from services.repository import ModelRepository

    repository = ModelRepository(ServingConfig.load(environ={}, arguments={}))
    repository.refresh()
    return repository


def both(http, grpc, model, tensors, outputs=None, version="", parameters=None, binary=True):
    """Runs one request on both transports; -> (REST result, gRPC result)."""
    results = []
    for client, module in ((http, thttp), (grpc, tgrpc)):
        inputs = []
        for name, array in tensors.items():
            datatype = "BYTES" if array.dtype == object else thttp_datatype(array)
            i = module.InferInput(name, list(array.shape), datatype)
            if module is thttp:
                i.set_data_from_numpy(array, binary_data=binary)
            else:
                i.set_data_from_numpy(array)
            inputs.append(i)
        requested = None
        if outputs:
            requested = [module.InferRequestedOutput(n, binary_data=binary) if module is thttp
                         else module.InferRequestedOutput(n) for n in outputs]
        results.append(client.infer(model, inputs, model_version=version, outputs=requested, parameters=parameters))
    return results


def thttp_datatype(array: np.ndarray) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(array.dtype)


def png_of(response: requests.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)))


# ---- health and metadata -------------------------------------------------------------------------

def test_health_and_server_metadata(server, http, grpc):
    assert http.is_server_live() and http.is_server_ready()
    assert grpc.is_server_live() and grpc.is_server_ready()
    for path in ("/v2", "/v2/"):
        r = requests.get(server.url + path, timeout=10)
        assert r.status_code == 200 and r.json()["name"] == "model-suite"
    assert requests.get(f"{server.url}/v2/health/ready", timeout=10).json() == {"ready": True}
    meta = http.get_server_metadata()
    assert meta["name"] == "model-suite" and "binary_tensor_data" in meta["extensions"]
    g = grpc.get_server_metadata(as_json=True)
    assert g["name"] == meta["name"] and g["version"] == meta["version"]


def test_model_metadata_from_contract(http, grpc, repo):
    for name in repo.names:
        stored = repo.stored(name)
        c = repo.contract(name)
        rest = http.get_model_metadata(name)
        g = grpc.get_model_metadata(name, as_json=True)
        assert rest["platform"] == g["platform"] == "onnxruntime_onnx"
        assert rest["versions"] == g["versions"] == repo.versions(name) and rest["versions"][0] == stored.version
        expected = [{"name": t.name, "datatype": t.oip_datatype, "shape": t.shape} for t in c.inputs]
        extra_in = [{"name": "text_input", "datatype": "BYTES", "shape": [1]}] if c.family == "generate" else []
        assert rest["inputs"] == expected + extra_in
        assert [{**t, "shape": [int(d) for d in t["shape"]]} for t in g["inputs"]] == expected + extra_in
        assert [t["name"] for t in rest["outputs"]] == [t.name for t in c.outputs] + (["text_output"] if extra_in else [])
        assert http.get_model_metadata(name, model_version=stored.version)["name"] == name
        assert http.is_model_ready(name) and grpc.is_model_ready(name)
        assert http.is_model_ready(name, stored.version) and grpc.is_model_ready(name, stored.version)


# ---- inference equals the native APIs ---------------------------------------------------------------

def test_classify_batch_matches_native(server, http, grpc, repo):
    from common.imaging import decode_image, to_model_input

    spec = repo.contract("classify").image
    pngs = [digit_png(i)[0] for i in (1700, 1710, 1720)]
    batch = np.concatenate([to_model_input(decode_image(p, "image", 10 ** 8), spec) for p in pngs])
    rest, g = both(http, grpc, "classify", {"image": batch})
    rest_json, _ = both(http, grpc, "classify", {"image": batch}, outputs=["probabilities"], binary=False)
    probs = rest.as_numpy("probabilities")
    assert probs.shape == (3, 10) and probs.dtype == np.float32
    np.testing.assert_allclose(g.as_numpy("probabilities"), probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(rest_json.as_numpy("probabilities"), probs)  # JSON round-trips FP32 exactly
    for png, row in zip(pngs, probs):
        native = requests.post(f"{server.url}/classify", files={"image": ("d.png", png, "image/png")},
                               data={"top_k": "10"}, timeout=60).json()["predictions"]
        got = {p["class_id"]: p["probability"] for p in native}
        np.testing.assert_allclose([got[i] for i in range(10)], row, rtol=1e-5, atol=1e-6)


def test_segment_matches_native(server, http, grpc, repo):
    from common.imaging import decode_image, to_model_input

    png, _ = scene_png()
    picture = decode_image(png, "image", 10 ** 8)
    x = to_model_input(picture, repo.contract("segment").image)
    rest, g = both(http, grpc, "segment", {"image": x})
    mask = rest.as_numpy("mask")
    assert mask.dtype == np.int64 and mask.shape == (1, x.shape[2], x.shape[3])
    np.testing.assert_array_equal(g.as_numpy("mask"), mask)
    native = png_of(requests.post(f"{server.url}/segment", files={"image": ("s.png", png, "image/png")}, timeout=60))
    full = np.asarray(Image.fromarray(mask[0].astype(np.uint8)).resize(picture.size, Image.Resampling.NEAREST))
    np.testing.assert_array_equal(native, full)


def test_denoise_matches_native(server, http, grpc):
    png, _ = photo_png(size=64)
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32) / 255.0
    sigma = 25.0
    feeds = {"noisy": pixels[None, None], "noise_level": np.full((1, 1), sigma / 255.0, np.float32)}
    rest, g = both(http, grpc, "denoise", feeds)
    out = rest.as_numpy("denoised")
    np.testing.assert_allclose(g.as_numpy("denoised"), out, rtol=1e-5, atol=1e-6)
    native = png_of(requests.post(f"{server.url}/denoise", files={"image": ("p.png", png, "image/png")},
                                  data={"sigma": str(sigma)}, timeout=60))
    mine = (np.clip(out[0, 0], 0, 1) * 255 + 0.5).astype(np.uint8)
    assert np.abs(mine.astype(int) - native.astype(int)).max() <= 1


def test_sample_matches_native_with_seed(server, http, grpc, repo):
    from common.imaging import grid

    n, seed = 5, 11
    c = repo.contract("sample")
    latent = np.random.default_rng(seed).standard_normal((n, c.input("latent").shape[1])).astype(np.float32)
    classes = (np.arange(n) % len(c.labels)).astype(np.int64)
    rest, g = both(http, grpc, "sample", {"latent": latent, "class_id": classes})
    images = rest.as_numpy("images")
    np.testing.assert_allclose(g.as_numpy("images"), images, rtol=1e-5, atol=1e-6)
    native = png_of(requests.post(f"{server.url}/sample", json={"n": n, "seed": seed}, timeout=60))
    mine = grid((np.clip(images[:, 0], 0, 1) * 255 + 0.5).astype(np.uint8), columns=min(n, 8))
    assert np.abs(mine.astype(int) - native.astype(int)).max() <= 1


def test_generate_text_matches_native_with_seed(server, http, grpc):
    params = {"max_new_tokens": 16, "temperature": 0.9, "top_k": 50, "seed": 5}
    native = requests.post(f"{server.url}/generate", json={"prompt": "The assert statement", **params},
                           timeout=120).json()
    prompt = np.array([b"The assert statement"], dtype=object)
    rest, g = both(http, grpc, "generate", {"text_input": prompt}, parameters=params)
    rest_json, _ = both(http, grpc, "generate", {"text_input": prompt[None]}, parameters=params, binary=False)
    assert rest.as_numpy("text_output")[0].decode() == native["text"]
    assert g.as_numpy("text_output")[0].decode() == native["text"]
    out = rest_json.as_numpy("text_output")
    assert out.shape == (1, 1) and out.ravel()[0] in (native["text"], native["text"].encode())
    assert rest.get_response()["parameters"]["finish_reason"] == native["finish_reason"]
    assert g.get_response().parameters["seed"].int64_param == 5
    # stop strings: a list in REST, a JSON list in a gRPC string parameter
    if len(native["text"]) >= 4:
        stop = native["text"][2:4]
        r, gg = both(http, grpc, "generate", {"text_input": prompt}, parameters={**params, "stop": json.dumps([stop])})
        for result in (r, gg):
            text = result.as_numpy("text_output")[0].decode()
            assert stop not in text and native["text"].startswith(text)


def test_generate_tensors_rest_equals_grpc(http, grpc, repo):
    c = repo.contract("generate")
    feeds = {"input_ids": np.array([[1, 2, 3]], np.int64), "attention_mask": np.ones((1, 3), np.int64),
             "position_ids": np.array([[0, 1, 2]], np.int64), "logit_index": np.array([2], np.int64)}
    for t in c.inputs:
        if t.name.startswith("past"):
            feeds[t.name] = np.zeros([1 if d < 0 and i == 0 else 0 if d < 0 else d for i, d in enumerate(t.shape)],
                                     np.float32)
    rest, g = both(http, grpc, "generate", feeds, outputs=["logits"])
    logits = rest.as_numpy("logits")
    assert logits.shape[:2] == (1, 1) and g.as_numpy("new.0.key") is None  # the last position's logits
    np.testing.assert_allclose(g.as_numpy("logits"), logits, rtol=1e-5, atol=1e-5)


def test_exact_version_addressing(http, grpc, repo):
    version = repo.versions("denoise")[-1]
    feeds = {"noisy": np.zeros((1, 1, 16, 16), np.float32), "noise_level": np.zeros((1, 1), np.float32)}
    rest, g = both(http, grpc, "denoise", feeds, version=version)
    assert rest.get_response()["model_version"] == version == g.get_response().model_version


# ---- binary tensor data extension by hand ----------------------------------------------------------

def test_binary_extension_by_hand(server):
    x = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    head = json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [2, 1, 28, 28],
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}).encode()
    r = requests.post(f"{server.url}/v2/models/classify/infer", data=head + x.tobytes(), timeout=60,
                      headers={"Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 200, r.text
    n = int(r.headers["Inference-Header-Content-Length"])
    meta = json.loads(r.content[:n])
    (out,) = meta["outputs"]
    assert out["shape"] == [2, 10] and out["parameters"]["binary_data_size"] == 2 * 10 * 4
    probs = np.frombuffer(r.content[n:], np.float32).reshape(2, 10)
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)

    prompt = b"Hello"
    blob = struct.pack("<I", len(prompt)) + prompt
    head = json.dumps({"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1],
                                   "parameters": {"binary_data_size": len(blob)}}],
                       "parameters": {"seed": 3, "max_new_tokens": 5, "binary_data_output": True}}).encode()
    r = requests.post(f"{server.url}/v2/models/generate/infer", data=head + blob, timeout=60,
                      headers={"Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 200, r.text
    n = int(r.headers["Inference-Header-Content-Length"])
    raw = r.content[n:]
    (length,) = struct.unpack_from("<I", raw)
    assert len(raw) == 4 + length
    native = requests.post(f"{server.url}/generate", json={"prompt": "Hello", "seed": 3, "max_new_tokens": 5},
                           timeout=60).json()
    assert raw[4:].decode() == native["text"]


# ---- errors on both transports ------------------------------------------------------------------

GOOD = np.zeros((1, 1, 28, 28), np.float32)


def _rest_error(http, model, tensors, version=""):
    with pytest.raises(InferenceServerException) as info:
        both_one(http, thttp, model, tensors, version)
    return info.value


def _grpc_error(grpc, model, tensors, version=""):
    with pytest.raises(InferenceServerException) as info:
        both_one(grpc, tgrpc, model, tensors, version)
    return info.value


def both_one(client, module, model, tensors, version):
    inputs = []
    for name, (datatype, array) in tensors.items():
        i = module.InferInput(name, list(array.shape), datatype)
        i.set_data_from_numpy(array)
        inputs.append(i)
    return client.infer(model, inputs, model_version=version)


@pytest.mark.parametrize("model, version, tensors, http_status, grpc_code, word", [
    ("nope", "", {"image": ("FP32", GOOD)}, "404", "StatusCode.NOT_FOUND", "nope"),
    ("classify", "no-such-version", {"image": ("FP32", GOOD)}, "404", "StatusCode.NOT_FOUND", "no-such-version"),
    ("classify", "", {"image": ("FP64", GOOD.astype(np.float64))}, "400", "StatusCode.INVALID_ARGUMENT", "image"),
    ("classify", "", {"image": ("FP32", np.zeros((1, 1, 27, 28), np.float32))}, "400", "StatusCode.INVALID_ARGUMENT",
     "image"),
    ("denoise", "", {"noisy": ("FP32", np.zeros((1, 1, 16, 16), np.float32))}, "400", "StatusCode.INVALID_ARGUMENT",
     "noise_level"),
    ("generate", "", {"text_input": ("BYTES", np.array([b"a", b"b"], dtype=object))}, "400",
     "StatusCode.INVALID_ARGUMENT", "text_input"),
])
def test_errors_on_both_transports(http, grpc, model, version, tensors, http_status, grpc_code, word):
    rest = _rest_error(http, model, tensors, version)
    assert rest.status() == http_status and word in rest.message()
    g = _grpc_error(grpc, model, tensors, version)
    assert g.status() == grpc_code and word in g.message()
    assert http.is_server_ready() and grpc.is_server_ready()
    ok = both_one(grpc, tgrpc, "classify", {"image": ("FP32", GOOD)}, "")
    assert ok.as_numpy("probabilities").shape == (1, 10)


def test_rest_error_bodies_and_metadata_errors(server, grpc):
    url = server.url
    r = requests.get(f"{url}/v2/models/nope", timeout=10)
    assert r.status_code == 404 and "error" in r.json()
    assert requests.get(f"{url}/v2/models/classify/versions/nope/ready", timeout=10).status_code == 404
    r = requests.post(f"{url}/v2/models/classify/infer", data=b"{not json", timeout=10)
    assert r.status_code == 400 and "error" in r.json()
    r = requests.post(f"{url}/v2/models/classify/infer", timeout=10,
                      json={"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.0]}]})
    assert r.status_code == 400 and "image" in r.json()["error"]
    r = requests.post(f"{url}/v2/models/generate/infer", timeout=10,
                      json={"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["x"]}],
                            "parameters": {"max_new_tokens": 0}})
    assert r.status_code == 400 and "max_new_tokens" in r.json()["error"]
    for call in (lambda: grpc.get_model_metadata("nope"), lambda: grpc.is_model_ready("classify", "nope")):
        with pytest.raises(InferenceServerException) as info:
            call()
        assert info.value.status() == "StatusCode.NOT_FOUND"
