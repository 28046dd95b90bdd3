"""Image to image: super-resolution, restoration, style transfer; any graph that maps a picture to
a picture. An upload in, a PNG out, at the output's own scale (``extra["scale"]``: output side per
input side, measured when the model was stored).

The input is made as the contract's image spec says (resize, rescale, mean/std, padding). Padding
the preprocessing added is cropped off the answer; the output's values are mapped from
``extra["output_range"]`` (default [0, 1]) to 0-255."""

from __future__ import annotations

from typing import Any

import numpy as np

from common.imaging import encode_png, resized_size
from contract import ModelContract
from services.budget import model_cost
from services.repository import ModelHandle
from services.tasks.base import ImageResult, image_psnr, NativeRoute, TaskHandler, Tensors, check_image_inputs, cpu_work, png_answer
from services.tasks.images import decode_cost, image_input, open_upload


def _fields(contract: ModelContract | None) -> dict[str, dict]:
    return {}


class ImageToImage(TaskHandler):
    name = "image-to-image"
    routes = (NativeRoute("/image_to_image", "transform", "image",
                          "Transform an image (super-resolution and other image-to-image models)", _fields,
                          png_answer("the output image as PNG, at the model's scale"), cancel_on_disconnect=True),)
    runs_long = True  # attention over a large picture is seconds of CPU

    measure, default_min_agreement, compare = "psnr_db", 30.0, image_psnr

    def check_values(self, contract: ModelContract, feeds: Tensors) -> None:
        check_image_inputs(contract, feeds)

    async def transform(self, handle: ModelHandle, image: bytes, values: dict[str, Any]) -> ImageResult:
        c = handle.contract
        opened = open_upload(image, c)
        width, height = resized_size(opened.width, opened.height, c.image)
        if c.image.resize == "shortest_edge":
            width, height = c.image.width, c.image.height
        scale = float(c.extra.get("scale", 1))
        out_pixels = int(width * height * scale * scale)
        cost = decode_cost(opened, c) + model_cost(c.limits, 1, width * height) + out_pixels * c.image.channels * 8
        async with self.budget.reserve(cost, f"a {opened.width}x{opened.height} image"):
            _, x = await image_input(opened, c)
            out = (await handle.infer({c.inputs[0].name: x}))[c.outputs[0].name][0]
            png = await cpu_work(out_pixels, _to_png, out, (round(height * scale), round(width * scale)),
                                 c.extra.get("output_range", [0.0, 1.0]), c.image.layout)
        return ImageResult(handle.tag, png)


def _to_png(out: np.ndarray, size: tuple[int, int], value_range: list[float], layout: str) -> bytes:
    """(C, H', W') output (or (H', W', C)) -> PNG of ``size`` (height, width): the preprocessing's
    padding cropped off, values mapped from ``value_range`` to 0-255."""
    planes = out if layout == "NCHW" else out.transpose(2, 0, 1)
    planes = planes[:, :size[0], :size[1]]
    if planes.dtype != np.uint8:
        low, high = value_range
        planes = (np.clip((planes - low) / (high - low), 0, 1) * 255 + 0.5).astype(np.uint8)
    pixels = planes[0] if planes.shape[0] == 1 else planes[:3].transpose(1, 2, 0)
    return encode_png(np.ascontiguousarray(pixels))


TASK = ImageToImage
