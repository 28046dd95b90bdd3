"""Semantic segmentation: an upload in, a PNG mask of the upload's size out (pixel value = class id).

A model may output the mask itself (integer class ids at its input size, resized back with
nearest neighbours) or per-class scores (float, (N, classes, h, w) at any scale, as SegFormer
does): those are upsampled bilinearly to the upload's size, as Hugging Face's
``post_process_semantic_segmentation`` does, and the mask is their argmax, strip by strip so a
large upload never holds every class at full size."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from common.imaging import encode_png
from contract import ModelContract
from services.budget import model_cost
from services.repository import ModelHandle
from services.rollout import mean_iou
from services.tasks.base import ImageResult, NativeRoute, TaskHandler, Tensors, check_image_inputs, cpu_work, png_answer
from services.tasks.images import decode_cost, image_input, open_upload

STRIP_BYTES = 16 * 1024 * 1024  # the upsampled scores held at once


def _fields(contract: ModelContract | None) -> dict[str, dict]:
    return {}


class Segmentation(TaskHandler):
    name = "semantic-segmentation"
    default_model = "segment"
    routes = (NativeRoute("/segment", "segment", "image", "Label mask of an image, same width and height", _fields,
                          png_answer("PNG mask; pixel value = class id")),)

    def check_values(self, contract: ModelContract, feeds: Tensors) -> None:
        check_image_inputs(contract, feeds)

    measure, default_min_agreement = "miou", 0.9

    def compare(self, contract: ModelContract, primary: dict, candidate: dict) -> float | None:
        """Mean IoU of the candidate's mask against the primary's (per-class scores: their argmax)."""
        a, b = primary[contract.outputs[0].name], candidate[contract.outputs[0].name]
        if a.shape != b.shape:
            return None
        if np.dtype(a.dtype).kind == "f":
            classes = a.shape[1]
            a, b = a.argmax(axis=1), b.argmax(axis=1)
        else:
            classes = len(contract.labels) or int(max(a.max(), b.max())) + 1
        return mean_iou(a.astype(np.int64), b.astype(np.int64), classes)

    async def segment(self, handle: ModelHandle, image: bytes, values: dict[str, Any]) -> ImageResult:
        """-> PNG mask at the upload's size."""
        c = handle.contract
        opened = open_upload(image, c)
        size = opened.size  # the mask comes back at the upload's size, whatever the picture was shrunk to
        h, w = (c.image.height or size[1], c.image.width or size[0]) if c.image else size[::-1]
        scores = np.dtype(c.outputs[0].dtype).kind == "f"
        cost = decode_cost(opened, c) + model_cost(c.limits, 1, h * w) + size[0] * size[1] * 2 + \
            (STRIP_BYTES * 2 if scores else 0)
        async with self.budget.reserve(cost, f"a {size[0]}x{size[1]} image"):
            _, x = await image_input(opened, c)
            out = (await handle.infer({c.inputs[0].name: x}))[c.outputs[0].name][0]
            make = _scores_png if scores else _mask_png
            png = await cpu_work(size[0] * size[1], make, out, size)
        return ImageResult(handle.tag, png)


def _mask_png(mask: np.ndarray, size: tuple[int, int]) -> bytes:
    full = Image.fromarray(mask.astype(np.uint8)).resize(size, Image.Resampling.NEAREST)
    return encode_png(np.asarray(full))


def _scores_png(scores: np.ndarray, size: tuple[int, int]) -> bytes:
    """(classes, h, w) scores -> the argmax of their bilinear upsampling to ``size`` (width, height)."""
    classes, h, w = scores.shape
    width, height = size
    x0, x1, wx = _linear(w, width)
    y0, y1, wy = _linear(h, height)
    # Along x once for every row of the scores (small), then along y strip by strip.
    across = scores[:, :, x0] * (1 - wx) + scores[:, :, x1] * wx  # (classes, h, width)
    mask = np.empty((height, width), np.uint8 if classes <= 256 else np.uint16)
    rows = max(1, STRIP_BYTES // (4 * classes * width))
    for top in range(0, height, rows):
        ys = slice(top, min(top + rows, height))
        strip = across[:, y0[ys]] * (1 - wy[ys, None]) + across[:, y1[ys]] * wy[ys, None]
        mask[ys] = strip.argmax(axis=0)
    return encode_png(mask if mask.dtype == np.uint8 else mask.astype(np.uint8))


def _linear(source: int, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Neighbours and weights of bilinear resampling from ``source`` to ``target`` samples with
    half-pixel centres and no antialiasing: torch's ``interpolate(mode="bilinear",
    align_corners=False)``."""
    scale = np.float32(source / target)
    centre = np.maximum((np.arange(target, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
    low = np.minimum(centre.astype(np.int64), source - 1)
    high = np.minimum(low + 1, source - 1)
    return low, high, (centre - low).astype(np.float32)


TASK = Segmentation
