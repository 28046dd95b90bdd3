"""What the image tasks share: an upload opened (header only) against the contract's limits, what
decoding it costs, and the model's input tensor made from it as the contract describes."""

from __future__ import annotations

import numpy as np
from PIL import Image

from contract import ModelContract
from services.budget import DECODE_BYTES_PER_PIXEL, DECODE_BYTES_PER_PIXEL_SHRUNK
from services.imaging import load_image, open_image, to_model_input
from services.tasks.base import cpu_work

GRAY_MODES = ("L", "I", "I;16", "F", "1")  # one plane; any other mode as three (RGB)


def fixed_size(contract: ModelContract) -> tuple[int, int] | None:
    """(width, height) the picture is shrunk towards right after decoding, or None when the model
    takes the upload's size or its preprocessing must see every decoded pixel (an imported model
    matching its own image processor exactly)."""
    spec = contract.image
    if spec is None or not spec.height or not spec.width or not spec.shrink_early:
        return None
    return spec.width, spec.height


def open_upload(data: bytes, contract: ModelContract, field: str = "image") -> Image.Image:
    """The upload's header only: the contract's pixel and side limits checked before decoding."""
    return open_image(data, field, contract.limits["max_pixels"], contract.limits.get("min_side", 1))


def decode_cost(image: Image.Image, contract: ModelContract) -> int:
    """Bytes the image path holds for this upload at its peak (known from the header alone)."""
    pixels = image.width * image.height
    # A model of fixed input size gets the picture shrunk right after decoding (load_image), so
    # only the decoded pixels and one RGBA copy are ever full size.
    per_pixel = DECODE_BYTES_PER_PIXEL_SHRUNK if fixed_size(contract) else DECODE_BYTES_PER_PIXEL
    return pixels * per_pixel


async def image_input(image: Image.Image, contract: ModelContract, field: str = "image") -> tuple[Image.Image, np.ndarray]:
    """Opened upload -> (picture, the model's input as the contract describes)."""
    pixels = image.width * image.height
    picture = await cpu_work(pixels, load_image, image, field, fixed_size(contract))
    return picture, await cpu_work(pixels, to_model_input, picture, contract.image)
