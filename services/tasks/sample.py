"""Image generation (GAN sampling): a seeded grid of class-conditional samples."""

from __future__ import annotations

import secrets
from typing import Any

import numpy as np

from common.imaging import encode_png, grid
from contract import ModelContract
from services.budget import model_cost
from services.repository import ModelHandle
from services.tasks.base import ImageResult, image_psnr, NativeRoute, TaskHandler, Tensors, check_int, png_answer
from services.errors import bad_request


def _fields(contract: ModelContract | None) -> dict[str, dict]:
    top, classes = (contract.limits["max_n"], len(contract.labels)) if contract is not None else (256, 1000)
    return {"n": {"type": "integer", "minimum": 1, "maximum": top, "default": 16},
            "seed": {"type": "integer", "minimum": 0, "maximum": 2 ** 63 - 1},
            "class_id": {"type": "integer", "minimum": 0, "maximum": classes - 1}}


class ImageGeneration(TaskHandler):
    name = "image-generation"
    default_model = "sample"
    routes = (NativeRoute("/sample", "sample", "json", "A grid of GAN samples", _fields,
                          png_answer("PNG grid, 8 samples per row; X-Seed holds the seed")),)

    measure, default_min_agreement, compare = "psnr_db", 30.0, image_psnr

    def check_values(self, contract: ModelContract, feeds: Tensors) -> None:
        for spec in contract.inputs:
            if spec.name == "class_id":
                ids = feeds[spec.name]
                if ids.size and (ids.min() < 0 or ids.max() >= len(contract.labels)):
                    raise bad_request(spec.name, f"class ids must be in 0..{len(contract.labels) - 1}")
            elif spec.dtype == "float32" and not np.isfinite(feeds[spec.name]).all():
                raise bad_request(spec.name, "values must be finite")

    async def sample(self, handle: ModelHandle, image: None, values: dict[str, Any]) -> ImageResult:
        """-> PNG grid of n samples, 8 per row, and the seed used. Same seed, same images."""
        c = handle.contract
        n, seed, class_id = values.get("n", 16), values.get("seed"), values.get("class_id")
        n = check_int("n", n, 1, c.limits["max_n"])
        if class_id is not None:
            class_id = check_int("class_id", class_id, 0, len(c.labels) - 1)
        seed = secrets.randbits(63) if seed is None else check_int("seed", seed, 0, 2 ** 63 - 1)
        rng = np.random.default_rng(seed)
        latent = rng.standard_normal((n, c.input("latent").shape[1])).astype(np.float32)
        classes = (np.full(n, class_id) if class_id is not None else np.arange(n) % len(c.labels)).astype(np.int64)
        async with self.budget.reserve(model_cost(c.limits, n), f"{n} samples", "n"):
            images = (await handle.infer({"latent": latent, "class_id": classes}))[c.outputs[0].name][:, 0]
        png = encode_png(grid((np.clip(images, 0, 1) * 255 + 0.5).astype(np.uint8), columns=min(n, 8)))
        return ImageResult(handle.tag, png, seed)


TASK = ImageGeneration
