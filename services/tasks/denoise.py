"""Image denoising at the upload's own size: colour channel by channel, a large image tile by tile
(``TileGrid``: the same answer as whole-image inference, in bounded memory)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from common.imaging import encode_png
from contract import ModelContract
from services.budget import model_cost
from services.errors import bad_request
from services.repository import ModelHandle
from services.tasks.base import ImageResult, image_psnr, NativeRoute, TaskHandler, Tensors, check_image_tensor, cpu_work, png_answer
from services.tasks.images import GRAY_MODES, decode, decode_cost, open_upload


def _fields(contract: ModelContract | None) -> dict[str, dict]:
    top = contract.limits["max_sigma"] if contract is not None else 255
    return {"sigma": {"type": "number", "minimum": 0, "maximum": top,
                      "description": "noise level on the 0-255 scale; omitted = blind"}}


class Denoising(TaskHandler):
    name = "image-denoising"
    default_model = "denoise"
    routes = (NativeRoute("/denoise", "denoise", "image", "Denoise an image", _fields,
                          png_answer("denoised PNG, same size and mode"), cancel_on_disconnect=True),)
    runs_long = True  # native size: a large photo is seconds of CPU

    measure, default_min_agreement, compare = "psnr_db", 30.0, image_psnr

    def check_values(self, contract: ModelContract, feeds: Tensors) -> None:
        noisy, level = contract.inputs[0].name, contract.inputs[1].name
        check_image_tensor(contract, noisy, feeds[noisy])
        levels = feeds[level]
        blind, top = contract.extra["blind_level"], contract.limits["max_sigma"] / 255
        ok = np.isclose(levels, blind) | ((levels >= 0) & (levels <= top))
        if not ok.all():
            raise bad_request(level, f"each value must be sigma/255 in [0, {top:.4f}] or {blind} (blind)")

    def sigma_level(self, contract: ModelContract, sigma: float | None) -> float:
        if sigma is None:
            return contract.extra["blind_level"]
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not np.isfinite(sigma):
            raise bad_request("sigma", f"must be a number, got {sigma!r}")
        top = contract.limits["max_sigma"]
        if not 0 <= sigma <= top:
            raise bad_request("sigma", f"must be between 0 and {top} (0-255 scale), got {sigma:g}")
        return sigma / 255.0

    async def denoise(self, handle: ModelHandle, image: bytes, values: dict[str, Any]) -> ImageResult:
        """-> PNG of the same size and mode; colour is denoised channel by channel (one row each).
        An image larger than a tile runs tile by tile (``TileGrid``): same answer, bounded memory."""
        c = handle.contract
        level = self.sigma_level(c, values.get("sigma"))
        opened = open_upload(image, c)
        pixels = opened.width * opened.height
        grid_ = TileGrid(opened.height, opened.width, self.config.tile_size, TILE_OVERLAP, c.image.multiple_of)
        window_pixels = grid_.window[0] * grid_.window[1]
        row_cost = model_cost(c.limits, 1, window_pixels) + window_pixels * 8
        # Rows per run: what a quarter of the budget holds, so a few large images can share it.
        room = (self.budget.capacity or 1 << 62) // 4 - decode_cost(opened, c)
        rows_per_run = int(max(1, min(c.max_batch or 64, room // max(1, row_cost))))
        channels = 1 if opened.mode in GRAY_MODES else 3
        rows_per_run = min(rows_per_run, channels * len(grid_.tiles))
        cost = decode_cost(opened, c) + rows_per_run * row_cost
        async with self.budget.reserve(cost, f"a {opened.width}x{opened.height} image"):
            picture = await decode(opened)
            planes, rgb = await cpu_work(pixels, _planes, picture)
            del picture
            out = await self._run_tiled(handle, planes, level, grid_, rows_per_run)
            return ImageResult(handle.tag, await cpu_work(pixels, _denoised_png, out, rgb))

    async def _run_tiled(self, handle: ModelHandle, planes: np.ndarray, level: float, grid_: "TileGrid",
                         rows_per_run: int) -> np.ndarray:
        c = handle.contract
        noisy, level_name = c.inputs[0].name, c.inputs[1].name
        if len(grid_.tiles) == 1:
            feeds = {noisy: planes, level_name: np.full((planes.shape[0], 1), level, np.float32)}
            return (await handle.infer(feeds))[c.outputs[0].name]
        out = np.empty_like(planes)
        jobs = [(channel, tile) for channel in range(planes.shape[0]) for tile in grid_.tiles]
        wh, ww = grid_.window
        for start in range(0, len(jobs), rows_per_run):
            chunk = jobs[start:start + rows_per_run]
            batch = np.stack([planes[ch, :, t.wy:t.wy + wh, t.wx:t.wx + ww] for ch, t in chunk])
            feeds = {noisy: batch, level_name: np.full((len(chunk), 1), level, np.float32)}
            result = (await handle.infer(feeds))[c.outputs[0].name]
            for (ch, t), row in zip(chunk, result):
                out[ch, :, t.y0:t.y1, t.x0:t.x1] = row[:, t.y0 - t.wy:t.y1 - t.wy, t.x0 - t.wx:t.x1 - t.wx]
        return out


TILE_OVERLAP = 32  # pixels of context each side of a tile: past the receptive field of the denoisers


@dataclass(frozen=True)
class Tile:
    y0: int  # the part of the output this tile gives (core), in image coordinates
    y1: int
    x0: int
    x1: int
    wy: int  # top-left corner of the window the model sees (core plus context)
    wx: int


class TileGrid:
    """Cores of ``tile`` pixels that cover the image, each seen through a window with ``overlap``
    pixels of context on every side. Every window has the same size (so tiles batch together): at
    the image's borders the window is shifted inwards instead of padded, so a border tile sees the
    image's own border exactly as whole-image inference does, and along a side shorter than a
    window the window is the whole side."""

    def __init__(self, height: int, width: int, tile: int, overlap: int, multiple_of: int = 1):
        side = tile + 2 * overlap
        side += (-side) % max(1, multiple_of)
        self.window = (min(side, height), min(side, width))
        ys = self._axis(height, self.window[0], tile, overlap)
        xs = self._axis(width, self.window[1], tile, overlap)
        self.tiles = [Tile(y0, y1, x0, x1, wy, wx) for y0, y1, wy in ys for x0, x1, wx in xs]

    @staticmethod
    def _axis(length: int, window: int, tile: int, overlap: int) -> list[tuple[int, int, int]]:
        if length <= window:
            return [(0, length, 0)]
        out = []
        for start in range(0, length, tile):
            end = min(start + tile, length)
            corner = min(max(0, start - overlap), length - window)
            out.append((start, end, corner))
        return out


def _planes(picture: Image.Image) -> tuple[np.ndarray, bool]:
    rgb = picture.mode not in GRAY_MODES
    pixels = np.asarray(picture.convert("RGB" if rgb else "L"), dtype=np.float32) / 255.0
    planes = pixels.transpose(2, 0, 1) if rgb else pixels[None]
    return np.ascontiguousarray(planes[:, None]), rgb  # (C, 1, H, W): one row per channel


def _denoised_png(out: np.ndarray, rgb: bool) -> bytes:
    """The model's planes (overwritten: in place, so no float copy of a large image is made) -> PNG."""
    planes = out[:, 0]
    np.clip(planes, 0, 1, out=planes)
    planes *= 255
    planes += 0.5
    pixels = planes.astype(np.uint8)
    return encode_png(pixels.transpose(1, 2, 0) if rgb else pixels[0])


TASK = Denoising
