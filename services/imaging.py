"""Image decoding and encoding for the HTTP APIs: decode uploads ourselves so bad bytes are a 400."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from contract import ImageSpec
from services.errors import RequestError

Image.MAX_IMAGE_PIXELS = None  # we enforce our own, documented limit below instead of PIL's warning


def decode_image(data: bytes, field: str, max_pixels: int, min_side: int = 1) -> Image.Image:
    if not data:
        raise RequestError(field, "empty upload; send a PNG or JPEG file")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise RequestError(field, f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
                               status=413)
        if min(width, height) < min_side:
            raise RequestError(field, f"image is {width}x{height}; both sides must be at least {min_side} pixels")
        image.load()
    except RequestError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise RequestError(field, f"not a decodable image ({type(exc).__name__}); send a PNG or JPEG file") from exc
    if image.mode in ("RGBA", "LA", "P"):  # flatten transparency onto white, as viewers show it
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image


def to_model_input(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """PIL image -> (1, C, H, W) float32 as the contract describes (size, channels, foreground, mean/std)."""
    image = image.convert("L" if spec.channels == 1 else "RGB")
    if spec.height and spec.width and image.size != (spec.width, spec.height):
        image = image.resize((spec.width, spec.height), Image.Resampling.BILINEAR, reducing_gap=None)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    if spec.channels == 1:
        if spec.foreground == "light" and pixels.mean() > 0.5:
            pixels = 1.0 - pixels  # dark ink on light paper: flip to the model's light-on-dark
        pixels = pixels[None]
    else:
        pixels = pixels.transpose(2, 0, 1)
    return ((pixels - spec.mean) / spec.std)[None].astype(np.float32)


def encode_png(pixels: np.ndarray) -> bytes:
    """(H, W) or (H, W, 3) uint8 -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def grid(images: np.ndarray, columns: int) -> np.ndarray:
    """(N, H, W) uint8 -> one (rows*H, columns*W) uint8 mosaic with a 2-pixel gutter."""
    n, h, w = images.shape
    rows = -(-n // columns)
    pad = 2
    out = np.zeros((rows * (h + pad) - pad, columns * (w + pad) - pad), np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        out[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = img
    return out
