"""Seeded generator of synthetic segmentation scenes: circles, rectangles and triangles on textured
backgrounds, with exact per-pixel masks. The same seed always draws the same scenes. The segment
family trains on them and the load tests send them; numpy only, so the load generator's image
ships this module without the training stack."""

from __future__ import annotations

import numpy as np

SCENE_CLASSES = ["background", "circle", "rectangle", "triangle"]


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(H, W, 3) in [0, 1]: random stripes and blobs plus pixel noise, so colour alone never tells."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0.15, 0.85, size=3).astype(np.float32)
    out = np.broadcast_to(base, (h, w, 3)).copy()
    for _ in range(rng.integers(1, 4)):
        freq = rng.uniform(0.05, 0.5)
        angle = rng.uniform(0, np.pi)
        wave = np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 2 * np.pi))
        out += wave[..., None] * rng.uniform(-0.15, 0.15, size=3).astype(np.float32)
    out += rng.normal(0, rng.uniform(0.01, 0.06), size=(h, w, 3)).astype(np.float32)
    return out


def _shape_mask(rng: np.random.Generator, kind: int, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    scale = min(h, w)
    cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
    if kind == 1:  # circle
        r = rng.uniform(0.08, 0.2) * scale
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if kind == 2:  # rectangle, rotated
        hh, hw = rng.uniform(0.07, 0.18, size=2) * scale
        a = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)
        v = -(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)
        return (np.abs(u) <= hw) & (np.abs(v) <= hh)
    # triangle: three vertices around the centre at spread-out angles, so it is never a sliver
    r = rng.uniform(0.12, 0.25) * scale
    start = rng.uniform(0, 2 * np.pi)
    angles = start + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.35, 0.35, size=3)
    px, py = cx + r * np.cos(angles), cy + r * np.sin(angles)
    inside = np.ones((h, w), bool)
    sign = np.sign((px[1] - px[0]) * (py[2] - py[0]) - (py[1] - py[0]) * (px[2] - px[0]))
    for i in range(3):
        j = (i + 1) % 3
        cross = (px[j] - px[i]) * (yy - py[i]) - (py[j] - py[i]) * (xx - px[i])
        inside &= sign * cross >= 0
    return inside


def generate_scene(rng: np.random.Generator, height: int = 64, width: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Returns (image (H, W, 3) float32 in [0, 1], mask (H, W) uint8 of class ids)."""
    image = _texture(rng, height, width)
    mask = np.zeros((height, width), np.uint8)
    for _ in range(rng.integers(1, 5)):
        kind = int(rng.integers(1, len(SCENE_CLASSES)))
        region = _shape_mask(rng, kind, height, width)
        fill = _texture(rng, height, width)
        image[region] = fill[region]
        mask[region] = kind  # later shapes cover earlier ones, in the mask as in the picture
    return np.clip(image, 0, 1), mask


def generate_scenes(count: int, seed: int, height: int = 64, width: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W, 3) float32 images and (N, H, W) uint8 masks."""
    rng = np.random.default_rng(seed)
    pairs = [generate_scene(rng, height, width) for _ in range(count)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
