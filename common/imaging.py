"""Image decoding and encoding for the image tasks: uploads are decoded here so bad bytes are a
refusal naming the field (``ImageRejected``, which serving answers with its status), and the pixel
limit is checked from the header before any pixel is decoded. Serving, the int8 calibration of an
import, training's out-of-distribution checks and the benchmark's reference server all preprocess
with ``to_model_input``, so none can drift from the contract.

Only the formats in ``IMAGE_FORMATS`` are opened (415 otherwise): each one Pillow would otherwise
try (TIFF, PSD, ICNS, ...) is more decoder code an upload can reach. Pillow's own decompression-bomb
guard stays on behind the contract's pixel limit, which is always the lower of the two."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from contract import ImageSpec

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"RIFF": "WEBP", b"BM": "BMP"}


class ImageRejected(ValueError):
    """An upload this module will not decode, naming the field to blame; ``status`` is the HTTP
    status a server answers it with: 400 not decodable, 413 too many pixels, 415 not an allowed format."""

    def __init__(self, field: str, message: str, status: int = 400):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status


def image_format(data: bytes) -> str | None:
    """The allowed format the upload's first bytes name, or None."""
    for magic, name in SIGNATURES.items():
        if data.startswith(magic) and (name != "WEBP" or data[8:12] == b"WEBP"):
            return name
    return None


def open_image(data: bytes, field: str, max_pixels: int, min_side: int = 1) -> Image.Image:
    """Reads the header only and checks the size limits, so an oversized upload costs no decoding."""
    if not data:
        raise ImageRejected(field, "empty upload; send a PNG or JPEG file")
    if image_format(data) is None:
        raise ImageRejected(field, f"not an image format this server decodes; send one of {list(IMAGE_FORMATS)}", 415)
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        width, height = image.size
    except Image.DecompressionBombError as exc:
        raise ImageRejected(field, f"image declares too many pixels for a safe decode ({exc})", 413) from None
    except Exception as exc:  # noqa: BLE001 - PIL's decoders raise many types; the upload is to blame
        raise ImageRejected(field, f"not a decodable image ({type(exc).__name__}); send a PNG or JPEG file") from exc
    if width * height > max_pixels:
        raise ImageRejected(field, f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
                            413)
    if min(width, height) < min_side:
        raise ImageRejected(field, f"image is {width}x{height}; both sides must be at least {min_side} pixels")
    return image


def load_image(image: Image.Image, field: str, target: tuple[int, int] | None = None) -> Image.Image:
    """Decodes the pixels of an opened image; transparency is flattened onto white, as viewers show it.

    ``target`` (width, height): the model only needs about that size, so a large upload is shrunk
    as early as possible: JPEG decodes at a reduced DCT scale (``draft``), any other format is
    reduced by an integer factor right after decoding, before the colour conversions that would
    each hold a full-size copy. The final resize to the exact size stays the caller's."""
    try:
        if target is not None and image.format == "JPEG":
            image.draft(image.mode, (target[0] * 2, target[1] * 2))
        image.load()
    except Exception as exc:  # noqa: BLE001
        raise ImageRejected(field, f"not a decodable image ({type(exc).__name__}); send a PNG or JPEG file") from exc
    if target is not None:
        factor = min(image.width // (2 * target[0]), image.height // (2 * target[1]))
        if factor >= 2:
            if image.mode not in ("L", "RGB", "RGBA", "LA", "I", "F"):
                image = image.convert("RGBA" if image.mode in ("P", "PA") else "RGB")
            image = image.reduce(factor)
    if image.mode in ("RGBA", "LA", "P", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image


def decode_image(data: bytes, field: str, max_pixels: int, min_side: int = 1) -> Image.Image:
    return load_image(open_image(data, field, max_pixels, min_side), field)


RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}


def resized_size(width: int, height: int, spec: ImageSpec) -> tuple[int, int]:
    """(width, height) the picture is resized to before any crop: what Hugging Face's image
    processors compute (``get_resize_output_image_size``: the short side to its target, the long
    one scaled and truncated)."""
    if spec.resize == "shortest_edge":
        short, long = sorted((width, height))
        new_short, new_long = spec.resize_to, int(spec.resize_to * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)
    if spec.resize == "exact" and spec.height and spec.width:
        return spec.width, spec.height
    return width, height


def to_model_input(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """PIL image -> the model's (1, C, H, W) input (or (1, H, W, C)) as the contract describes:
    resize, centre crop, rescale, mean/std, padding."""
    image = image.convert("L" if spec.channels == 1 else "RGB")
    size = resized_size(image.width, image.height, spec)
    if image.size != size:
        image = image.resize(size, RESAMPLE[spec.resample], reducing_gap=None)
    if spec.resize == "shortest_edge" and image.size != (spec.width, spec.height):
        left, top = (image.width - spec.width) // 2, (image.height - spec.height) // 2
        image = image.crop((left, top, left + spec.width, top + spec.height))
    if spec.dtype == "uint8":
        pixels = np.asarray(image, dtype=np.uint8)
    else:
        pixels = np.asarray(image, dtype=np.float32)
        # The suite's models were trained on pixels / 255 exactly; other factors as their processors do.
        pixels = pixels / 255.0 if abs(spec.rescale - 1 / 255) < 1e-12 else pixels * np.float32(spec.rescale)
        if spec.channels == 1 and spec.foreground == "light" and pixels.mean() > 0.5:
            pixels = 1.0 - pixels  # dark ink on light paper: flip to the model's light-on-dark
    pixels = pixels[..., None] if spec.channels == 1 else pixels  # (H, W, C)
    if spec.dtype != "uint8":
        pixels = normalised(pixels, spec.mean, spec.std)
    if spec.pad_to:
        h, w = pixels.shape[:2]
        pixels = np.pad(pixels, ((0, (h // spec.pad_to + 1) * spec.pad_to - h),
                                 (0, (w // spec.pad_to + 1) * spec.pad_to - w), (0, 0)), mode="symmetric")
    if spec.layout == "NCHW":
        pixels = pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(pixels[None]).astype(spec.dtype, copy=False)


def normalised(pixels: np.ndarray, mean: float | list[float], std: float | list[float]) -> np.ndarray:
    """(H, W, C) float32 minus mean over std, one value or one per channel."""
    if isinstance(mean, (int, float)) and isinstance(std, (int, float)):
        if mean == 0 and std == 1:
            return pixels
        return (pixels - mean) / std
    return (pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


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
