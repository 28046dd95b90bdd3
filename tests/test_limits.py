"""The limits that keep hostile or oversized input from taking a worker down, without a server: the
memory budget (refuse what never fits, queue what does not fit now), the tiling of large images,
byte sizes and the cgroup limit, hostile JSON, declared tensor shapes against a contract, and
error text without filesystem paths."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from common.resources import cgroup_memory_limit
from contract import ImageSpec, ModelContract, TensorSpec
from services.budget import MemoryBudget, model_cost, worker_budget
from services.config import ServingConfig, parse_bytes
from services.errors import ServingError
from services.frontends.asgi import parse_json
from services.repository import without_paths
from services.tasks.classify import ImageClassification
from services.tasks.denoise import Denoising, TileGrid

MIB = 1024 * 1024


def test_budget_refuses_what_never_fits_and_queues_what_does_not_fit_now():
    async def main():
        budget = MemoryBudget(100 * MIB, wait_s=0.5)
        with pytest.raises(ServingError) as never:
            async with budget.reserve(101 * MIB, "a huge image"):
                pass
        order = []

        async def hold(name: str, cost: int, seconds: float):
            async with budget.reserve(cost * MIB, name):
                order.append(name)
                await asyncio.sleep(seconds)

        # 60 + 60 > 100: the second waits for the first; a small third one may not jump the queue.
        await asyncio.gather(hold("first", 60, 0.1), hold("second", 60, 0.0), hold("third", 10, 0.0))
        assert budget.used == 0 and budget.peak <= 100 * MIB
        first = asyncio.ensure_future(hold("long", 90, 1.0))
        await asyncio.sleep(0.05)
        with pytest.raises(ServingError) as waited:
            async with budget.reserve(50 * MIB, "a second image"):
                pass
        await first
        return never.value, order, waited.value

    never, order, waited = asyncio.run(main())
    assert never.status == 413 and "101 MiB" in never.message and "100 MiB" in never.message
    assert order == ["first", "second", "third", "long"]
    assert waited.status == 503 and waited.retry_after


def test_no_limit_means_no_budget():
    async def main():
        budget = MemoryBudget(None)
        async with budget.reserve(1 << 50, "anything"):
            return budget.used

    assert asyncio.run(main()) == 0
    assert worker_budget(None, 0.8, 2, 100) is None
    assert worker_budget(1536 * MIB, 0.8, 2, 260 * MIB) == int(1536 * MIB * 0.8 / 2) - 260 * MIB


def test_model_cost_reads_the_contract():
    assert model_cost({"peak_bytes_per_pixel": 100}, 3, 1000) == 300_000
    assert model_cost({"peak_bytes_per_row": 5000}, 4) == 20_000
    assert model_cost({}, 4, 1000) == 0  # exported before it was measured


@pytest.mark.parametrize("height, width", [(2000, 2000), (321, 700), (100, 5000), (64, 64), (257, 256)])
def test_tiles_cover_the_image_once_with_equal_windows(height, width):
    grid = TileGrid(height, width, tile=256, overlap=32, multiple_of=8)
    covered = np.zeros((height, width), np.int32)
    wh, ww = grid.window
    for t in grid.tiles:
        covered[t.y0:t.y1, t.x0:t.x1] += 1
        assert 0 <= t.wy <= t.y0 and t.y1 <= t.wy + wh <= height
        assert 0 <= t.wx <= t.x0 and t.x1 <= t.wx + ww <= width
        # context on every side that is not the image's border
        assert t.y0 == 0 or t.y0 - t.wy >= 32 or t.wy + wh == height
    assert (covered == 1).all()


def test_tiled_denoising_equals_whole_image_for_a_local_filter():
    """A 5x5 box filter stands in for the model: any network whose receptive field is inside the
    overlap gives the same pixels tiled or whole."""

    def box(x: np.ndarray) -> np.ndarray:
        padded = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)), mode="reflect")
        return sum(padded[:, :, dy:dy + x.shape[2], dx:dx + x.shape[3]] for dy in range(5) for dx in range(5)) / 25

    class Handle:
        contract = ModelContract("d", "denoise", "denoise", "box",
                                 [TensorSpec("noisy", "float32", [-1, 1, -1, -1], ["batch", "channel", "height", "width"]),
                                  TensorSpec("noise_level", "float32", [-1, 1], ["batch", "level"])],
                                 [TensorSpec("denoised", "float32", [-1, 1, -1, -1])],
                                 image=ImageSpec(0, 0, 1, multiple_of=1), limits={"max_batch": 64})

        async def infer(self, feeds):
            return {"denoised": box(feeds["noisy"])}

    planes = np.random.default_rng(0).random((3, 1, 700, 530), dtype=np.float32)
    grid = TileGrid(700, 530, tile=128, overlap=16)
    tiled = asyncio.run(Denoising()._run_tiled(Handle(), planes, 0.1, grid, rows_per_run=5))
    np.testing.assert_allclose(tiled, box(planes), atol=1e-6)


def test_bytes_and_the_cgroup_limit(tmp_path):
    assert parse_bytes("m", "1536Mi") == 1536 * MIB and parse_bytes("m", "2G") == 2 * 10 ** 9
    assert parse_bytes("m", "") is None
    with pytest.raises(ValueError):
        parse_bytes("m", "lots")
    (tmp_path / "memory.max").write_text("1610612736\n")
    assert cgroup_memory_limit(str(tmp_path)) == 1536 * MIB
    (tmp_path / "memory.max").write_text("max\n")
    assert cgroup_memory_limit(str(tmp_path)) is None


def test_model_control_settings():
    assert ServingConfig.load({}, {}).model_control == "none"
    with pytest.raises(ValueError, match="admin_key"):
        ServingConfig.load({"SUITE_MODEL_CONTROL": "explicit"}, {})
    with pytest.raises(ValueError, match="differ"):
        ServingConfig.load({"SUITE_MODEL_CONTROL": "explicit", "SUITE_ADMIN_KEY": "k", "SUITE_API_KEY": "k"}, {})


@pytest.mark.parametrize("body, word", [(b"[" * 100_000, "nested"), (b"[1" + b"0" * 5000 + b"]", "json"),
                                        (b'{"a": NaN}', "json"), (b'{"a": Infinity}', "json"), (b"\xff", "json")])
def test_hostile_json_is_a_400(body, word):
    with pytest.raises(ServingError) as refused:
        parse_json(body)
    assert refused.value.status == 400 and word in str(refused.value).lower()


def test_declared_tensors_are_checked_before_decoding():
    contract = ModelContract("classify", "classify", "image-classification", "lenet5",
                             [TensorSpec("image", "float32", [-1, 1, 28, 28], ["batch", "channel", "height", "width"])],
                             [TensorSpec("probabilities", "float32", [-1, 10], ["batch", "class"])],
                             limits={"max_pixels": 16_000_000, "max_batch": 256})
    handler = ImageClassification()
    handler.check_declared(contract, "image", "FP32", [256, 1, 28, 28])
    for name, datatype, shape, status in [("image", "FP32", [257, 1, 28, 28], 413), ("x", "FP32", [1], 400),
                                          ("image", "BYTES", [1, 1, 28, 28], 400), ("image", "FP32", [1, 784], 400),
                                          ("image", "FP32", [1, 1, 28, -1], 400)]:
        with pytest.raises(ServingError) as refused:
            handler.check_declared(contract, name, datatype, shape)
        assert refused.value.status == status, (name, shape)
    assert handler.body_limit(contract, binary=True, json_limit=1 << 20) == 64 * 1024 + 256 * 784 * 4


def test_error_text_carries_no_paths():
    text = "Load model from /root/.bentoml/models/segment/v1/model.onnx failed: /usr/lib/x.so"
    assert "/root" not in without_paths(text) and "model.onnx" in without_paths(text)


def test_tiled_denoising_matches_whole_image_on_a_packaged_photo(built_models):
    """The real denoiser, tiled against whole, on a packaged photograph at sigma 25: the issue's
    bound is 0.05 dB of PSNR; the receptive field is inside the overlap, so they are equal."""
    from pathlib import Path

    import bentoml
    from skimage import data

    from common.runtime import OnnxSession

    session = OnnxSession(Path(bentoml.models.get("denoise").path) / "model.onnx")

    class Handle:
        contract = session.contract

        async def infer(self, feeds):
            return session.run(feeds)

    clean = data.camera()[:320, :384].astype(np.float32) / 255
    noisy = np.clip(clean + np.random.default_rng(0).normal(0, 25 / 255, clean.shape), 0, 1).astype(np.float32)
    planes = noisy[None, None]

    def psnr(x: np.ndarray) -> float:
        return float(10 * np.log10(1 / np.mean((np.clip(x, 0, 1) - clean) ** 2)))

    multiple = session.contract.image.multiple_of
    whole = asyncio.run(Denoising()._run_tiled(Handle(), planes, 25 / 255, TileGrid(320, 384, 1024, 32, multiple), 4))
    grid = TileGrid(320, 384, 96, 32, multiple)
    assert len(grid.tiles) > 1
    tiled = asyncio.run(Denoising()._run_tiled(Handle(), planes, 25 / 255, grid, 3))
    assert abs(psnr(whole[0, 0]) - psnr(tiled[0, 0])) <= 0.05
