"""What the image tasks share: an upload opened (header only) against the contract's limits, what
decoding it costs, and the model's input tensor made from it as the contract describes."""

from __future__ import annotations

import numpy as np
from PIL import Image

from common.imaging import ImageRejected, load_image, open_image, to_model_input
from contract import ModelContract
from services.budget import DECODE_BYTES_PER_PIXEL, DECODE_BYTES_PER_PIXEL_SHRUNK
from services.errors import ServingError
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


def refused(exc: ImageRejected) -> ServingError:
    """common.imaging's refusal of an upload as the serving core's error: same field, message, status."""
    return ServingError(exc.field, exc.message, exc.status)


def open_upload(data: bytes, contract: ModelContract, field: str = "image") -> Image.Image:
    """The upload's header only: the contract's pixel and side limits checked before decoding."""
    try:
        return open_image(data, field, contract.limits["max_pixels"], contract.limits.get("min_side", 1))
    except ImageRejected as exc:
        raise refused(exc) from None


async def decode(image: Image.Image, field: str = "image", target: tuple[int, int] | None = None) -> Image.Image:
    """An opened upload's pixels (``load_image``, off the event loop), shrunk towards ``target``."""
    try:
        return await cpu_work(image.width * image.height, load_image, image, field, target)
    except ImageRejected as exc:
        raise refused(exc) from exc


def decode_cost(image: Image.Image, contract: ModelContract) -> int:
    """Bytes the image path holds for this upload at its peak (known from the header alone)."""
    pixels = image.width * image.height
    # A model of fixed input size gets the picture shrunk right after decoding (load_image), so
    # only the decoded pixels and one RGBA copy are ever full size.
    per_pixel = DECODE_BYTES_PER_PIXEL_SHRUNK if fixed_size(contract) else DECODE_BYTES_PER_PIXEL
    return pixels * per_pixel


async def image_input(image: Image.Image, contract: ModelContract, field: str = "image") -> tuple[Image.Image, np.ndarray]:
    """Opened upload -> (picture, the model's input as the contract describes)."""
    picture = await decode(image, field, fixed_size(contract))
    return picture, await cpu_work(image.width * image.height, to_model_input, picture, contract.image)
