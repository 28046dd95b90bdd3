"""Real request payloads for load tests and benchmarks: a held-out handwritten digit, a generated
scene, a natural photograph. numpy/PIL only, so load generators need no torch."""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@lru_cache
def digit_png(index: int = 1700, size: int = 64) -> tuple[bytes, int]:
    """A digit from the end of scikit-learn's set as a PNG, and its true label."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images[index] * 255 / 16).astype(np.uint8)
    return png_bytes(np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR))), int(digits.target[index])


@lru_cache
def scene_png(seed: int = 99_999, size: int = 64) -> tuple[bytes, np.ndarray]:
    from common.scenes import generate_scene

    image, mask = generate_scene(np.random.default_rng(seed), size, size)
    return png_bytes((image * 255 + 0.5).astype(np.uint8)), mask


@lru_cache
def photo_png(name: str = "camera", size: int = 128) -> tuple[bytes, np.ndarray]:
    """A centre crop of a held-out scikit-image photo: (noisy PNG at sigma 25, clean uint8)."""
    import skimage.data

    clean = getattr(skimage.data, name)()
    if clean.ndim == 3:
        clean = (np.asarray(Image.fromarray(clean).convert("L")))
    top, left = (clean.shape[0] - size) // 2, (clean.shape[1] - size) // 2
    clean = clean[top:top + size, left:left + size]
    noisy = clean / 255.0 + np.random.default_rng(0).normal(0, 25 / 255, clean.shape)
    return png_bytes((np.clip(noisy, 0, 1) * 255 + 0.5).astype(np.uint8)), clean
