"""Serving-core logic without a server: the task handlers' limits (each gives the right error), the
Open Inference Protocol codecs, the multipart parser, the configuration, and the model repository
over tiny ONNX models made here."""

from __future__ import annotations

import asyncio
import io
import os
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from contract import CONTRACT_KEY, ONNX_FILE, ImageSpec, ModelContract, TensorSpec
from services.batching import DynamicBatcher
from services.config import ServingConfig
from services.errors import ServingError
from services.frontends.multipart import parse_multipart
from services.frontends.oip_codec import serialize_bytes, tensor_from_list, tensor_from_raw, tensor_to_raw
from services.repository import ModelRepository, StoredVersion, batch_major
from services.tasks.classify import ImageClassification
from services.tasks.denoise import Denoising
from services.tasks.generate import TextGeneration
from services.tasks.sample import ImageGeneration
from services.tasks.segment import Segmentation


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def raises(status: int, field: str, coro_or_fn, *args):
    with pytest.raises(ServingError) as info:
        result = coro_or_fn(*args)
        if asyncio.iscoroutine(result):
            asyncio.run(result)
    assert info.value.status == status, info.value
    assert info.value.field == field, info.value
    return info.value


# ---- contracts and a stand-in handle ----------------------------------------------------------------

BATCH_IMAGE = ["batch", "channel", "height", "width"]
CLASSIFY = ModelContract(
    "classify", "classify", "image-classification", "tiny",
    [TensorSpec("image", "float32", [-1, 1, 4, 4], BATCH_IMAGE)],
    [TensorSpec("probabilities", "float32", [-1, 2], ["batch", "class"])],
    image=ImageSpec(4, 4, 1), labels=["a", "b"], limits={"max_pixels": 10_000, "max_batch": 8})
SEGMENT = ModelContract(
    "segment", "segment", "semantic-segmentation", "tiny",
    [TensorSpec("image", "float32", [-1, 3, -1, -1], BATCH_IMAGE)],
    [TensorSpec("mask", "int64", [-1, -1, -1], ["batch", "height", "width"])],
    image=ImageSpec(8, 8, 3, multiple_of=8), labels=["bg", "fg"], limits={"max_pixels": 4096, "max_batch": 4})
DENOISE = ModelContract(
    "denoise", "denoise", "image-denoising", "tiny",
    [TensorSpec("noisy", "float32", [-1, 1, -1, -1], BATCH_IMAGE), TensorSpec("noise_level", "float32", [-1, 1], ["batch", "level"])],
    [TensorSpec("denoised", "float32", [-1, 1, -1, -1], BATCH_IMAGE)],
    image=ImageSpec(0, 0, 1), limits={"max_pixels": 4096, "max_sigma": 100, "min_side": 8, "max_batch": 4},
    extra={"blind_level": -1.0})
SAMPLE = ModelContract(
    "sample", "sample", "image-generation", "tiny",
    [TensorSpec("latent", "float32", [-1, 4], ["batch", "latent"]), TensorSpec("class_id", "int64", [-1], ["batch"])],
    [TensorSpec("images", "float32", [-1, 1, 2, 2], BATCH_IMAGE)], labels=["0", "1", "2"], limits={"max_n": 6})
GENERATE = ModelContract(
    "generate", "generate", "text-generation", "tiny",
    [TensorSpec("input_ids", "int64", [-1, -1], ["batch", "sequence"]),
     TensorSpec("attention_mask", "int64", [-1, -1], ["batch", "past_and_sequence"]),
     TensorSpec("position_ids", "int64", [-1, -1], ["batch", "sequence"]),
     TensorSpec("past.0.key", "float32", [-1, 2, -1, 4], ["batch", "head", "past_sequence", "head_dim"])],
    [TensorSpec("logits", "float32", [-1, 1, 50], ["batch", "last", "vocab"])],
    limits={"max_new_tokens": 20, "context_window": 32, "max_prompt_chars": 100, "max_batch": 4})


class FakeHandle:
    def __init__(self, contract: ModelContract, outputs):
        self.contract, self.tag, self.name, self.version = contract, f"{contract.name}:v1", contract.name, "v1"
        self.outputs = outputs
        self.calls: list[dict] = []
        self.state: dict = {}

    async def infer(self, feeds):
        self.calls.append(feeds)
        return self.outputs(feeds)


def classify_handle():
    return FakeHandle(CLASSIFY, lambda f: {"probabilities": np.tile(np.float32([[0.25, 0.75]]), (len(f["image"]), 1))})


# ---- task handlers: the task path -----------------------------------------------------------------

def test_classify_answers_top_k_from_the_handle_that_ran():
    handle = classify_handle()
    body = asyncio.run(ImageClassification().classify(handle, png(np.zeros((10, 12), np.uint8)), {"top_k": 1}))
    assert body == {"model": "classify:v1", "predictions": [{"label": "b", "class_id": 1, "probability": 0.75}]}
    (feeds,) = handle.calls
    assert feeds["image"].shape == (1, 1, 4, 4) and feeds["image"].dtype == np.float32  # resized per the contract


@pytest.mark.parametrize("image, top_k, status, field", [
    (b"", 5, 400, "image"),
    (b"not an image", 5, 415, "image"),  # no allowed format's magic bytes
    (png(np.zeros((200, 200), np.uint8)), 5, 413, "image"),  # 40,000 pixels > max_pixels 10,000
    (png(np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8))[:60], 5, 400, "image"),  # truncated pixels
    (png(np.zeros((4, 4), np.uint8)), 0, 400, "top_k"),
    (png(np.zeros((4, 4), np.uint8)), 101, 400, "top_k"),
    (png(np.zeros((4, 4), np.uint8)), "3", 400, "top_k"),
])
def test_classify_limits(image, top_k, status, field):
    handle = classify_handle()
    raises(status, field, ImageClassification().classify, handle, image, {"top_k": top_k})
    assert not handle.calls  # refused before any session run


def test_segment_mask_comes_back_at_the_upload_size():
    handle = FakeHandle(SEGMENT, lambda f: {"mask": np.ones((1, 8, 8), np.int64)})
    out = asyncio.run(Segmentation().segment(handle, png(np.zeros((30, 20, 3), np.uint8)), {}))
    mask = np.asarray(Image.open(io.BytesIO(out.png)))
    assert mask.shape == (30, 20) and (mask == 1).all()


def test_denoise_limits_and_planes():
    handle = FakeHandle(DENOISE, lambda f: {"denoised": f["noisy"]})
    rgb = png(np.full((16, 16, 3), 100, np.uint8))
    out = asyncio.run(Denoising().denoise(handle, rgb, {"sigma": 25}))
    assert np.asarray(Image.open(io.BytesIO(out.png))).shape == (16, 16, 3)
    feeds = handle.calls[0]
    assert feeds["noisy"].shape == (3, 1, 16, 16)  # one row per colour channel
    np.testing.assert_allclose(feeds["noise_level"], 25 / 255)
    asyncio.run(Denoising().denoise(handle, rgb, {}))
    assert handle.calls[-1]["noise_level"][0, 0] == -1.0  # blind
    raises(400, "sigma", Denoising().denoise, handle, rgb, {"sigma": 101})  # max_sigma
    raises(400, "sigma", Denoising().denoise, handle, rgb, {"sigma": -1})
    raises(400, "image", Denoising().denoise, handle, png(np.zeros((4, 40), np.uint8)), {"sigma": 10})  # min_side 8
    raises(413, "image", Denoising().denoise, handle, png(np.zeros((80, 80), np.uint8)), {"sigma": 10})  # max_pixels


def test_sample_limits_and_seed():
    handle = FakeHandle(SAMPLE, lambda f: {"images": np.zeros((len(f["latent"]), 1, 2, 2), np.float32)})
    handler = ImageGeneration()
    first = asyncio.run(handler.sample(handle, None, {"n": 3, "seed": 11}))
    again = asyncio.run(handler.sample(handle, None, {"n": 3, "seed": 11}))
    assert first.seed == 11 and first.png == again.png
    np.testing.assert_array_equal(handle.calls[0]["latent"], handle.calls[1]["latent"])
    np.testing.assert_array_equal(handle.calls[0]["class_id"], [0, 1, 2])
    raises(400, "n", handler.sample, handle, None, {"n": 7})  # max_n 6
    raises(400, "n", handler.sample, handle, None, {"n": 0})
    raises(400, "class_id", handler.sample, handle, None, {"n": 2, "class_id": 3})
    raises(400, "seed", handler.sample, handle, None, {"n": 2, "seed": -1})


def test_sampling_parameters_parsed_once_for_every_front_end():
    handler, handle = TextGeneration(), FakeHandle(GENERATE, None)
    params = handler.sampling(handle, {"max_new_tokens": 5, "temperature": 0.5, "top_k": 3.0, "stop": '["\\n"]', "seed": 4})
    assert (params.max_new_tokens, params.temperature, params.top_k, params.stop, params.seed) == (5, 0.5, 3, ("\n",), 4)
    assert handler.sampling(handle, {"max_new_tokens": 3}).seed is not None  # random, echoed by the responses
    for values, field in [({"max_new_tokens": 21}, "max_new_tokens"), ({"max_new_tokens": 0}, "max_new_tokens"),
                          ({"temperature": "hot"}, "temperature"), ({"temperature": True}, "temperature"),
                          ({"top_k": 1.5}, "top_k"), ({"top_p": 0}, "top_p"), ({"seed": -1}, "seed"),
                          ({"stop": [1]}, "stop"), ({"stop": "[broken"}, "stop"), ({"stop": ["x"] * 9}, "stop")]:
        raises(400, field, handler.sampling, handle, {"max_new_tokens": 3, **values})


# ---- task handlers: the tensor path ---------------------------------------------------------------

@pytest.mark.parametrize("handler, contract, feeds, status, field", [
    (ImageClassification(), CLASSIFY, {"image": np.zeros((9, 1, 4, 4), np.float32)}, 400, "image"),  # max_batch 8
    (ImageClassification(), CLASSIFY, {"image": np.zeros((1, 1, 4, 4), np.float64)}, 400, "image"),
    (ImageClassification(), CLASSIFY, {"image": np.zeros((1, 1, 4, 5), np.float32)}, 400, "image"),
    (ImageClassification(), CLASSIFY, {"picture": np.zeros((1, 1, 4, 4), np.float32)}, 400, "image"),
    (ImageClassification(), CLASSIFY, {"image": np.zeros((0, 1, 4, 4), np.float32)}, 400, "image"),
    (Segmentation(), SEGMENT, {"image": np.zeros((1, 3, 12, 16), np.float32)}, 400, "image"),  # multiple_of 8
    (Segmentation(), SEGMENT, {"image": np.zeros((2, 3, 64, 64), np.float32)}, 413, "image"),  # max_pixels 4096
    (Denoising(), DENOISE, {"noisy": np.zeros((1, 1, 8, 8), np.float32),
                            "noise_level": np.full((1, 1), 0.5, np.float32)}, 400, "noise_level"),  # > 100/255
    (Denoising(), DENOISE, {"noisy": np.zeros((2, 1, 8, 8), np.float32),
                            "noise_level": np.zeros((1, 1), np.float32)}, 400, "inputs"),  # batch sizes disagree
    (ImageGeneration(), SAMPLE, {"latent": np.zeros((2, 4), np.float32), "class_id": np.array([0, 3])}, 400, "class_id"),
    (ImageGeneration(), SAMPLE, {"latent": np.zeros((7, 4), np.float32), "class_id": np.zeros(7, np.int64)}, 400, "latent"),
    (ImageGeneration(), SAMPLE, {"latent": np.full((1, 4), np.inf, np.float32), "class_id": np.zeros(1, np.int64)}, 400, "latent"),
    (TextGeneration(), GENERATE, {"input_ids": np.array([[50]]), "attention_mask": np.ones((1, 1), np.int64),
                                  "position_ids": np.array([[0]]), "past.0.key": np.zeros((1, 2, 0, 4), np.float32)},
     400, "input_ids"),  # vocab 50
    (TextGeneration(), GENERATE, {"input_ids": np.zeros((1, 3), np.int64), "attention_mask": np.ones((1, 33), np.int64),
                                  "position_ids": np.zeros((1, 3), np.int64), "past.0.key": np.zeros((1, 2, 30, 4), np.float32)},
     400, "input_ids"),  # window 32
    (TextGeneration(), GENERATE, {"input_ids": np.zeros((1, 1), np.int64), "attention_mask": np.ones((1, 1), np.int64),
                                  "position_ids": np.array([[32]]), "past.0.key": np.zeros((1, 2, 0, 4), np.float32)},
     400, "position_ids"),
    (TextGeneration(), GENERATE, {"input_ids": np.zeros((1, 2), np.int64), "attention_mask": np.ones((1, 3), np.int64),
                                  "position_ids": np.zeros((1, 2), np.int64), "past.0.key": np.zeros((1, 2, 0, 4), np.float32)},
     400, "attention_mask"),  # 3 mask slots for 0 past + 2 new
    (TextGeneration(), GENERATE, {"input_ids": np.zeros((1, 2), np.int64), "attention_mask": np.ones((1, 2), np.int64),
                                  "position_ids": np.zeros((1, 1), np.int64), "past.0.key": np.zeros((1, 2, 0, 4), np.float32)},
     400, "position_ids"),
])
def test_tensor_limits(handler, contract, feeds, status, field):
    handle = FakeHandle(contract, lambda f: {})
    feeds = {k: v.astype(np.int64) if v.dtype.kind == "i" else v for k, v in feeds.items()}
    raises(status, field, handler.infer_tensors, handle, feeds, {})
    assert not handle.calls


def test_text_input_checks():
    handle = FakeHandle(GENERATE, None)
    bad_utf8 = np.array([b"\xff\xfe"], dtype=object)
    raises(400, "text_input", TextGeneration().infer_tensors, handle, {"text_input": bad_utf8}, {})
    two = np.array([b"a", b"b"], dtype=object)
    raises(400, "text_input", TextGeneration().infer_tensors, handle, {"text_input": two}, {})
    raises(400, "input_ids", TextGeneration().infer_tensors, handle,
           {"text_input": np.array([b"a"], dtype=object), "input_ids": np.zeros((1, 1), np.int64)}, {})


# ---- Open Inference Protocol codecs ---------------------------------------------------------------

def test_codecs_round_trip_and_refuse_mismatches():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(tensor_from_raw("x", "FP32", [2, 3], tensor_to_raw(x)), x)
    np.testing.assert_array_equal(tensor_from_list("x", "INT64", [2, 3], [[0, 1, 2], [3, 4, 5]]), x.astype(np.int64))
    words = np.array([b"a", "\u00e9".encode()], dtype=object)
    assert list(tensor_from_raw("w", "BYTES", [2], serialize_bytes(words))) == list(words)
    raises(400, "x", tensor_from_raw, "x", "FP32", [2, 4], tensor_to_raw(x))  # 24 bytes for 32
    raises(400, "x", tensor_from_list, "x", "FP32", [2, 2], [1.0, 2.0, 3.0])
    raises(400, "x", tensor_from_list, "x", "INT32", [2], [1.5, 2])
    raises(400, "x", tensor_from_list, "x", "FP32", [1], ["a"])
    raises(400, "x", tensor_from_list, "x", "FP99", [1], [1])
    raises(400, "x", tensor_from_list, "x", "FP32", [-1], [1])
    # a shape that claims billions of elements is refused before anything is allocated
    raises(400, "x", tensor_from_raw, "x", "FP32", [100_000, 100_000, 100_000], b"\0" * 4)
    raises(400, "w", tensor_from_raw, "w", "BYTES", [2], b"\x05\0\0\0ab")  # runs past the end
    raises(400, "w", tensor_from_raw, "w", "BYTES", [1], serialize_bytes(words))  # more elements than declared


# ---- multipart ------------------------------------------------------------------------------------

def form(*parts: tuple[str, bytes, str | None], boundary: str = "XyZ") -> tuple[bytes, str]:
    body = b""
    for name, data, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_multipart_parses_files_and_fields():
    body, content_type = form(("image", b"\x89PNG\r\n\x1a\n--Xy\r\n", "a.png"), ("top_k", b"3", None))
    parts = parse_multipart(b"preamble\r\n" + body, content_type)
    assert parts["image"].data == b"\x89PNG\r\n\x1a\n--Xy\r\n" and parts["image"].filename == "a.png"
    assert parts["top_k"].text() == "3"
    quoted = content_type.replace("boundary=XyZ", 'boundary="XyZ"')
    assert parse_multipart(body, quoted)["top_k"].data == b"3"


@pytest.mark.parametrize("mangle, field", [
    (lambda body, ct: (body, "multipart/form-data"), "content-type"),  # no boundary
    (lambda body, ct: (body, ct.replace("XyZ", "other")), "body"),  # wrong boundary
    (lambda body, ct: (body[:-20], ct), "body"),  # truncated
    (lambda body, ct: (body.replace(b'name="top_k"', b'nom="top_k"'), ct), "body"),  # part without a name
    (lambda body, ct: (body.replace(b"\r\n\r\n3", b"\r\n3"), ct), "body"),  # no blank line after headers
    (lambda body, ct: (body.replace(b'name="top_k"', b'name="image"'), ct), "image"),  # given twice
    (lambda body, ct: (body, "application/json"), "content-type"),
])
def test_multipart_malformations_are_400s(mangle, field):
    body, content_type = form(("image", b"data", "a.png"), ("top_k", b"3", None))
    raises(400, field, parse_multipart, *mangle(body, content_type))


# ---- configuration --------------------------------------------------------------------------------

def test_config_layers_env_then_arguments():
    config = ServingConfig.load(environ={"SUITE_WORKERS": "3", "SUITE_BATCHING": "false", "SUITE_PROVIDERS": "A,B",
                                         "SUITE_MAX_QUEUE_DELAY_MS": "1.5"},
                                arguments={"workers": "2", "nonsense": "1"})
    assert (config.workers, config.batching, config.providers, config.max_queue_delay_ms) == (2, False, ("A", "B"), 1.5)
    assert config.extra == {"nonsense": "1"}
    assert ServingConfig.load(environ={}, arguments={}).worker_count >= 1
    for environ in ({"SUITE_WORKERS": "two"}, {"SUITE_BATCHING": "maybe"}, {"SUITE_MAX_BATCH_SIZE": "0"},
                    {"SUITE_MODELS": "classify,Not A Name"}, {"SUITE_MODEL_LIMITS": "denoise.nope=3"},
                    {"SUITE_LOG_LEVEL": "verbose"}):
        with pytest.raises(ValueError):
            ServingConfig.load(environ=environ, arguments={})


@pytest.mark.parametrize("environ", [{}, {"SUITE_WORKERS": "3"}, {"SUITE_WORKERS": "0"}, {"SUITE_WORKERS": ""}])
def test_the_load_tests_count_the_workers_as_the_server_does(environ):
    """loadtest.servers.suite_worker_count restates ServingConfig.worker_count's rule (the load tests
    import nothing from services): they must agree."""
    from loadtest.servers import suite_worker_count

    assert suite_worker_count(environ) == ServingConfig.load(environ=environ, arguments={}).worker_count



def test_served_names_defaults_then_the_stores_other_models():
    from services.repository import served_names
    from services.tasks import default_models, task_classes

    class Store:
        def list_names(self, tasks):
            stored = {"classify": "image-classification", "denoise-bsd": "image-denoising",
                      "generate-shakespeare": "text-generation", "someone-elses": "speech-recognition"}
            return [name for name, task in stored.items() if task in tasks]

    assert default_models() == ("classify", "segment", "generate", "denoise", "sample")
    assert served_names(ServingConfig(), Store(), default_models(), task_classes()) == (
        "classify", "segment", "generate", "denoise", "sample", "denoise-bsd", "generate-shakespeare")
    assert served_names(ServingConfig(models=("denoise-bsd",)), Store()) == ("denoise-bsd",)
    # a model name may hold dots: the limit is what follows the last one
    config = ServingConfig.load(environ={"SUITE_MODEL_LIMITS": "generate-shakespeare.v2.max_queue=7"}, arguments={})
    assert config.limits("generate-shakespeare.v2").max_queue == 7 and config.limits("generate").max_queue == 256


def test_api_key_from_a_file(tmp_path):
    (tmp_path / "key").write_text("s3cret\n")
    assert ServingConfig.load(environ={"SUITE_API_KEY_FILE": str(tmp_path / "key")}, arguments={}).api_key == "s3cret"
    both = {"SUITE_API_KEY_FILE": str(tmp_path / "key"), "SUITE_API_KEY": "direct"}
    assert ServingConfig.load(environ=both, arguments={}).api_key == "direct"
    with pytest.raises(ValueError, match="SUITE_API_KEY_FILE"):
        ServingConfig.load(environ={"SUITE_API_KEY_FILE": str(tmp_path / "missing")}, arguments={})


@pytest.mark.parametrize("files, quota", [
    ({"cpu.max": "max 100000\n"}, None),  # cgroup v2, no limit
    ({"cpu.max": "200000 100000\n"}, 2),  # a Kubernetes limit of 2 CPUs
    ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 CPUs round up
    ({"cpu.max": "50000 100000\n"}, 1),
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_cpu_quota_caps_the_cores(tmp_path, files, quota):
    from common.resources import available_cores, cgroup_cpu_quota

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_quota(str(tmp_path)) == quota
    assert available_cores(str(tmp_path)) == min(len(os.sched_getaffinity(0)), quota or 10**6)

# ---- the model repository -------------------------------------------------------------------------

def tiny_classifier(folder: Path, scale: float) -> None:
    """image (N,1,4,4) -> softmax(flatten(image) @ W): a real ONNX model with the contract inside."""
    weights = helper.make_tensor("W", TensorProto.FLOAT, [16, 2], list(np.linspace(-scale, scale, 32)))
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["image"], ["flat"]), helper.make_node("MatMul", ["flat", "W"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)],
        "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 4, 4])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 2])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {CONTRACT_KEY: CLASSIFY.to_json()})
    folder.mkdir(parents=True)
    onnx.save(model, str(folder / ONNX_FILE))


class FolderStore:
    def __init__(self, root: Path):
        self.root = root

    def list_versions(self, name: str) -> list[StoredVersion]:
        found = [StoredVersion(name, p.name, p, {"task": "image-classification"}, float(p.name[1:]))
                 for p in (self.root / name).iterdir()]
        return sorted(found, key=lambda v: v.created_at, reverse=True)


def test_repository_versions_handles_and_readiness(tmp_path):
    for version, scale in (("v1", 1.0), ("v2", 2.0)):
        tiny_classifier(tmp_path / "classify" / version, scale)
    config = ServingConfig(models=("classify",), max_batch_size=16)
    repository = ModelRepository(config, FolderStore(tmp_path))
    assert not repository.all_ready()
    (newest,) = repository.start()
    assert newest.tag == "classify:v2" and repository.versions("classify") == ["v2", "v1"]
    assert repository.all_ready() and repository.is_ready("classify") and not repository.is_ready("classify", "v1")
    assert batch_major(newest.contract) and newest.runner.max_batch_size == 8  # the contract's max_batch caps it
    raises(404, "model", repository.stored, "nope")
    raises(404, "version", repository.stored, "classify", "v9")

    async def both():
        x = np.ones((3, 1, 4, 4), np.float32)
        old = await repository.handle("classify", "v1")  # loads on first use
        new = await repository.handle("classify")
        results = await asyncio.gather(old.infer({"image": x}), new.infer({"image": x}))
        await repository.close()
        return old, new, results

    old, new, (p_old, p_new) = asyncio.run(both())
    assert (old.tag, new.tag) == ("classify:v1", "classify:v2")
    assert p_old["probabilities"].shape == (3, 2)
    np.testing.assert_allclose(p_old["probabilities"].sum(1), 1, rtol=1e-5)
    assert not np.allclose(p_old["probabilities"], p_new["probabilities"])  # each version ran its own weights
    assert repository.loaded() == []


# ---- the HTTP request body bound ------------------------------------------------------------------

def test_request_body_is_bounded_before_and_while_reading():
    from services.frontends.asgi import Request

    def request(headers: dict, chunks: list[bytes]) -> Request:
        messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
        read = []

        async def receive():
            read.append(1)
            return messages.pop(0)

        scope = {"type": "http", "method": "POST", "path": "/", "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}
        return Request(scope, receive, max_body_bytes=10), read

    ok, _ = request({"content-length": "6"}, [b"abc", b"def"])
    assert asyncio.run(ok.body()) == b"abcdef"
    declared, read = request({"content-length": "11"}, [b"x" * 11])
    raises(413, "body", declared.body)
    assert not read  # refused on the declared length, nothing read
    chunked, _ = request({}, [b"x" * 6, b"x" * 6])
    raises(413, "body", chunked.body)
    bad, _ = request({"content-length": "ten"}, [b""])
    raises(400, "content-length", bad.body)


def test_reload_lets_running_requests_finish_on_the_old_version(tmp_path):
    from services.repository import WantedState

    for version, scale in (("v1", 1.0), ("v2", 2.0)):
        tiny_classifier(tmp_path / "classify" / version, scale)
    repository = ModelRepository(ServingConfig(models=("classify",)), FolderStore(tmp_path), drain_timeout=10)
    repository.start({"classify": WantedState(True, "v1")})
    old = repository._loaded[("classify", "v1")]
    real_run = old.runner._run

    def slow_run(feeds):
        time.sleep(0.5)
        return real_run(feeds)

    old.runner._run = slow_run
    x = np.ones((1, 1, 4, 4), np.float32)

    async def scenario():
        running = asyncio.ensure_future((await repository.handle("classify")).infer({"image": x}))
        await asyncio.sleep(0.1)  # in its session run on v1
        errors = await repository.apply({"classify": WantedState()})  # the newest: v2
        new = await repository.handle("classify")
        fresh = await new.infer({"image": x})
        finished = await running  # not refused: v1 drains before it closes
        await asyncio.sleep(0.3)
        closed = old.runner._closed
        await repository.apply({"classify": WantedState(False)})
        with pytest.raises(ServingError) as unloaded:
            await repository.handle("classify")
        broken = await repository.apply({"classify": WantedState(True, "v9")})
        await repository.close()
        return errors, new.tag, fresh, finished, closed, unloaded.value, broken

    errors, tag, fresh, finished, closed, unloaded, broken = asyncio.run(scenario())
    assert errors == {} and tag == "classify:v2" and closed
    assert finished["probabilities"].shape == fresh["probabilities"].shape == (1, 2)
    assert not np.allclose(finished["probabilities"], fresh["probabilities"])  # each ran its own version
    assert unloaded.status == 503 and "unloaded" in unloaded.message
    assert "classify:v9" in broken["classify"]


def test_admission_refuses_on_queue_length_and_expected_wait():
    async def scenario():
        gate = threading.Event()

        def run(feeds):
            gate.wait(5)
            return {"y": feeds["x"]}

        batcher = DynamicBatcher("m", run, max_batch_size=1, max_queue=2, max_queue_wait_s=0.2, concurrency=1)
        x = {"x": np.zeros((1, 2), np.float32)}
        first = asyncio.ensure_future(batcher.submit(x))  # runs, and blocks on the gate
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(batcher.submit(x))]
        await asyncio.sleep(0.05)
        admitted = batcher.admission_error()
        await asyncio.sleep(0.3)  # the waiting request is now past the 0.2 s budget
        by_wait = batcher.admission_error()
        batcher.max_queue_wait_s = 0  # no time budget: only the length counts
        queued.append(asyncio.ensure_future(batcher.submit(x)))
        await asyncio.sleep(0.05)
        by_length = batcher.admission_error()
        gate.set()
        await asyncio.gather(first, *queued)
        await asyncio.sleep(0.05)
        idle_after = batcher.idle()
        await batcher.close()
        assert admitted is None
        return by_length, by_wait, idle_after

    by_length, by_wait, idle_after = asyncio.run(scenario())
    assert by_length.status == 503 and "2 requests waiting" in by_length.message and by_length.retry_after
    assert by_wait.status == 503 and "budget" in by_wait.message
    assert idle_after


def test_grpc_health_follows_readiness():
    """NOT_SERVING while the data plane is not ready (a model loading), SERVING once it is; the
    answer is read at each call, never cached."""
    import asyncio

    from grpc_health.v1 import health_pb2

    from services.frontends.oip_grpc import HealthServicer

    class Plane:
        ready_now = False

        def ready(self) -> bool:
            return self.ready_now

    plane = Plane()
    servicer = HealthServicer(plane)
    request = health_pb2.HealthCheckRequest(service="")
    assert asyncio.run(servicer.Check(request, None)).status == health_pb2.HealthCheckResponse.NOT_SERVING
    plane.ready_now = True
    assert asyncio.run(servicer.Check(request, None)).status == health_pb2.HealthCheckResponse.SERVING


def test_cors_origins_are_origins():
    from services.config import ServingConfig

    config = ServingConfig.load(environ={"SUITE_CORS_ORIGINS": "https://a.example, http://localhost:8080"}, arguments={})
    assert config.cors_origins == ("https://a.example", "http://localhost:8080")
    for bad in ("a.example", "https://a.example/path", "ftp://a.example"):
        with pytest.raises(ValueError, match="cors_origins"):
            ServingConfig.load(environ={"SUITE_CORS_ORIGINS": bad}, arguments={})
