"""Task handlers, one per task: validate -> preprocess from the contract -> run -> postprocess.

Each handler serves two kinds of request against a repository handle:
* the task itself (``classify`` an uploaded image, ``generate`` text from a prompt, ...): what the
  native HTTP API exposes; media in, media or JSON-ready results out;
* raw tensors (``infer_tensors``): what the Open Inference Protocol exposes.
Every limit of the contract is checked here, once, for both kinds and so for every protocol."""

from __future__ import annotations

import asyncio
import math
import secrets
from dataclasses import dataclass
from typing import Any, AsyncIterator, Mapping

import numpy as np
from PIL import Image

from contract import DTYPES, ModelContract, TensorSpec
from services.errors import bad_request, too_large
from services.budget import DECODE_BYTES_PER_PIXEL, DECODE_BYTES_PER_PIXEL_SHRUNK, MemoryBudget, model_cost
from services.config import ServingConfig
from services.imaging import encode_png, grid, load_image, open_image, to_model_input
from services.repository import ModelHandle
from services.textengine import Sequence
from services.textgen import Chunk, Completion, SamplingParams, parse_sampling

Tensors = dict[str, np.ndarray]
# Images up to this many pixels are decoded and encoded on the event loop: a thread hop costs more
# than the work. Larger ones go to a thread so the loop keeps serving.
INLINE_PIXELS = 256 * 256
TOP_K_CAP = 100
GRAY_MODES = ("L", "I", "I;16", "F", "1")  # denoised as one plane; any other mode as three (RGB)
BYTES_DTYPE = np.dtype(object)


async def cpu_work(pixels: int, fn, *args):
    if pixels <= INLINE_PIXELS:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def fixed_size(contract: ModelContract) -> tuple[int, int] | None:
    """(width, height) the model's input is resized to, or None when it takes the upload's size."""
    spec = contract.image
    return (spec.width, spec.height) if spec is not None and spec.height and spec.width else None


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
    """Opened upload -> (picture, the model's (1, C, H, W) input as the contract describes)."""
    pixels = image.width * image.height
    picture = await cpu_work(pixels, load_image, image, field, fixed_size(contract))
    return picture, await cpu_work(pixels, to_model_input, picture, contract.image)


def check_int(field: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise bad_request(field, f"must be an integer, got {value!r}")
    if not low <= value <= high:
        raise bad_request(field, f"must be between {low} and {high}, got {value}")
    return int(value)


@dataclass
class TensorResult:
    outputs: Tensors
    parameters: dict[str, Any]
    final: bool = True  # the last result of its request (decoupled inference sends several)


class TaskHandler:
    """The tensor path shared by every task: names, datatypes and shapes against the contract, then
    the batch limit, then the task's own limits (``check_values``)."""

    task = ""
    runs_long = False  # a request may take seconds: cancelled when its client leaves

    def __init__(self, budget: MemoryBudget | None = None, config: ServingConfig | None = None):
        self.budget = budget or MemoryBudget(None)  # the worker's memory for requests in flight
        self.config = config or ServingConfig()
        # contract -> {input name: (its spec or extra tensor, its element limit)}: check_declared
        # runs on every tensor request; the contract is held, so its id() is not reused.
        self._declared: dict[int, tuple[ModelContract, dict[str, tuple[Any, int | None]]]] = {}

    def tensor_cost(self, contract: ModelContract, feeds: Tensors) -> int:
        """What running these tensors holds: the inputs and outputs' own bytes are small next to the
        graph's activations, measured per pixel or per row at export."""
        rows = max((a.shape[0] for a in feeds.values() if a.ndim), default=1)
        pixels = max((a.shape[-1] * a.shape[-2] for a in feeds.values() if a.ndim == 4), default=0)
        return model_cost(contract.limits, rows, pixels) + sum(a.nbytes for a in feeds.values() if a.dtype != object)

    def max_elements(self, contract: ModelContract, spec: TensorSpec) -> int | None:
        """The most elements a request may send for ``spec`` (None: the contract does not bound it):
        batch axes at the model's batch limit, image sides at its pixel limit, sequence axes at its
        context window, fixed axes as they are."""
        limits, count, spatial = contract.limits, 1, False
        for size, axis in zip(spec.shape, spec.axis_names or [""] * len(spec.shape)):
            if size >= 0:
                count *= size
            elif axis in ("height", "width") and "max_pixels" in limits:
                if not spatial:  # the pixel limit counts every row: it bounds batch x height x width
                    count *= limits["max_pixels"]
                    spatial = True
            elif axis == "batch":
                continue  # folded in below, unless the pixel limit already covers it
            elif axis in ("sequence", "past_sequence", "past_and_sequence") and "context_window" in limits:
                count *= limits["context_window"]
            else:
                return None
        if "batch" in spec.axis_names and not spatial:
            count *= contract.max_batch or 64
        return count

    def check_declared(self, contract: ModelContract, name: str, datatype: Any, shape: Any) -> None:
        """A tensor's name, datatype and declared shape against the contract, before its data is
        decoded: an unknown input, a wrong datatype or rank, or more elements than the model can
        take is refused without reading a byte of it."""
        cached = self._declared.get(id(contract))
        if cached is None or cached[0] is not contract:
            inputs = {t.name: (t, self.max_elements(contract, t)) for t in contract.inputs}
            inputs.update((t["name"], (t, None)) for t in self.extra_tensors(contract)[0])
            cached = self._declared[id(contract)] = (contract, inputs)
        known = cached[1].get(name)
        if known is None:
            raise bad_request(name, f"unknown input tensor; {contract.name} takes {list(cached[1])}")
        spec, limit = known
        if isinstance(spec, dict):  # a task's extra tensor (text in): one element
            if datatype != spec["datatype"]:
                raise bad_request(name, f"datatype {datatype!r} given, {spec['datatype']} expected")
            if not isinstance(shape, (list, tuple)) or len(shape) > 2 or any(d != 1 for d in shape):
                raise bad_request(name, f"shape {shape!r} given, [1] or [1, 1] expected")
            return
        if datatype != spec.oip_datatype:
            raise bad_request(name, f"datatype {datatype!r} given, {spec.oip_datatype} expected")
        if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                            for d in shape):
            raise bad_request(name, f"shape must be a list of non-negative integers, got {shape!r}")
        if not shape_matches(spec, tuple(shape)):
            raise bad_request(name, f"shape {list(shape)} does not match {spec.shape} ({', '.join(spec.axis_names)})")
        count = math.prod(shape)  # Python integers: no overflow for hostile shapes
        if limit is not None and count > limit:
            raise too_large(name, f"shape {list(shape)} holds {count} elements; {contract.name} takes at most {limit}")

    def body_limit(self, contract: ModelContract, binary: bool, json_limit: int) -> int | None:
        """The largest OIP inference body this model can need (None: unbounded by the contract)."""
        total = 64 * 1024  # the JSON header, names, parameters
        for spec in contract.inputs:
            count = self.max_elements(contract, spec)
            if count is None:
                return None
            total += count * (np.dtype(spec.dtype).itemsize if binary and spec.dtype != "object" else 24)
        for extra in self.extra_tensors(contract)[0]:  # text: the prompt, escaped in JSON at worst
            total += 6 * 4 * contract.limits.get("max_prompt_chars", json_limit // 24)
        return total

    def check_tensors(self, contract: ModelContract, feeds: Tensors) -> Tensors:
        specs = {t.name: t for t in contract.inputs}
        missing = [n for n in specs if n not in feeds]
        if missing:
            raise bad_request(missing[0], f"missing input tensor; {contract.name} needs {list(specs)}")
        unknown = [n for n in feeds if n not in specs]
        if unknown:
            raise bad_request(unknown[0], f"unknown input tensor; {contract.name} takes {list(specs)}")
        for name, array in feeds.items():
            spec = specs[name]
            if array.dtype != np.dtype(spec.dtype):
                raise bad_request(name, f"datatype {DTYPES.get(array.dtype.name, array.dtype.name)} given, "
                                        f"{spec.oip_datatype} expected")
            if not shape_matches(spec, array.shape):
                raise bad_request(name, f"shape {list(array.shape)} does not match {spec.shape} "
                                        f"({', '.join(spec.axis_names)})")
        rows = {array.shape[0] for name, array in feeds.items() if specs[name].axis_names[:1] == ["batch"]}
        if len(rows) > 1:
            raise bad_request("inputs", f"inputs disagree on the batch size: {sorted(rows)}")
        if rows:
            (n,), first = rows, next(iter(feeds))
            if contract.max_batch and n > contract.max_batch:
                raise bad_request(first, f"batch of {n} rows; the limit is {contract.max_batch}")
            if n == 0:
                raise bad_request(first, "batch of 0 rows")
        self.check_values(contract, feeds)
        return feeds

    def check_values(self, contract: ModelContract, feeds: Tensors) -> None:
        """Task limits on tensor contents and sizes (pixel counts, class ids, token ids)."""

    async def infer_tensors(self, handle: ModelHandle, feeds: Tensors, parameters: Mapping[str, Any]) -> TensorResult:
        feeds = self.check_tensors(handle.contract, feeds)
        async with self.budget.reserve(self.tensor_cost(handle.contract, feeds), "this request", "inputs"):
            outputs = await handle.infer(feeds)
        return TensorResult(outputs, {})

    async def stream_tensors(self, handle: ModelHandle, feeds: Tensors,
                             parameters: Mapping[str, Any]) -> AsyncIterator[TensorResult]:
        """Decoupled inference: the results of one request as they come; one result for models that
        answer at once (every task but text generation)."""
        result = await self.infer_tensors(handle, feeds, parameters)

        async def one() -> AsyncIterator[TensorResult]:
            yield result

        return one()

    def extra_tensors(self, contract: ModelContract) -> tuple[list[dict], list[dict]]:
        """Inputs/outputs a task offers beyond the model's own (text in, text out), for metadata."""
        return [], []


def shape_matches(spec: TensorSpec, shape: tuple[int, ...]) -> bool:
    return len(shape) == len(spec.shape) and all(d < 0 or d == s for d, s in zip(spec.shape, shape))


def check_image_tensor(contract: ModelContract, name: str, array: np.ndarray) -> None:
    """(N, C, H, W) image tensors: the pixel limit counts every row, sides obey min_side/multiple_of."""
    n, _, h, w = array.shape
    limits = contract.limits
    if "max_pixels" in limits and n * h * w > limits["max_pixels"]:
        raise too_large(name, f"{n} x {h} x {w} = {n * h * w} pixels; the limit is {limits['max_pixels']}")
    multiple = contract.image.multiple_of if contract.image else 1
    min_side = max(limits.get("min_side", 1), multiple)
    if min(h, w) < min_side:
        raise bad_request(name, f"height and width must be at least {min_side}, got {h} x {w}")
    if h % multiple or w % multiple:
        raise bad_request(name, f"height and width must be multiples of {multiple}, got {h} x {w}")


# ---- image classification ----------------------------------------------------------------------------

OOD_OUTPUTS = ("ood_score", "reconstruction_error")


class ImageClassification(TaskHandler):
    task = "classify"

    async def classify(self, handle: ModelHandle, image: bytes, top_k: int = 5) -> dict:
        c = handle.contract
        top_k = check_int("top_k", top_k, 1, TOP_K_CAP)
        opened = open_upload(image, c)
        cost = decode_cost(opened, c) + model_cost(c.limits, 1)
        async with self.budget.reserve(cost, f"a {opened.width}x{opened.height} image"):
            _, x = await image_input(opened, c)
            outputs = await handle.infer({c.inputs[0].name: x})
        probs = outputs[c.outputs[0].name][0]
        order = np.argsort(-probs, kind="stable")[: min(top_k, probs.size)]
        body = {"model": handle.tag,
                "predictions": [{"label": c.labels[i], "class_id": int(i), "probability": float(probs[i])}
                                for i in order]}
        # A model exported with the digit autoencoder says how unlike its training digits the input is.
        for name in OOD_OUTPUTS:
            if name in outputs:
                body[name] = float(outputs[name][0])
        return body


# ---- semantic segmentation ---------------------------------------------------------------------------

class Segmentation(TaskHandler):
    task = "segment"

    def check_values(self, contract: ModelContract, feeds: Tensors) -> None:
        for spec in contract.inputs:
            check_image_tensor(contract, spec.name, feeds[spec.name])

    async def segment(self, handle: ModelHandle, image: bytes) -> bytes:
        """-> PNG mask at the upload's size; pixel value = class id."""
        c = handle.contract
        opened = open_upload(image, c)
        size = opened.size  # the mask comes back at the upload's size, whatever the picture was shrunk to
        _, _, h, w = (d if d > 0 else s for d, s in zip(c.inputs[0].shape, (1, 1, *size[::-1])))
        cost = decode_cost(opened, c) + model_cost(c.limits, 1, h * w) + size[0] * size[1] * 2
        async with self.budget.reserve(cost, f"a {size[0]}x{size[1]} image"):
            picture, x = await image_input(opened, c)
            mask = (await handle.infer({c.inputs[0].name: x}))[c.outputs[0].name][0]
            return await cpu_work(size[0] * size[1], _mask_png, mask, size)


def _mask_png(mask: np.ndarray, size: tuple[int, int]) -> bytes:
    full = Image.fromarray(mask.astype(np.uint8)).resize(size, Image.Resampling.NEAREST)
    return encode_png(np.asarray(full))


# ---- image denoising ---------------------------------------------------------------------------------

class Denoising(TaskHandler):
    task = "denoise"
    runs_long = True  # native size: a large photo is seconds of CPU

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

    async def denoise(self, handle: ModelHandle, image: bytes, sigma: float | None = None) -> bytes:
        """-> PNG of the same size and mode; colour is denoised channel by channel (one row each).
        An image larger than a tile runs tile by tile (``TileGrid``): same answer, bounded memory."""
        c = handle.contract
        level = self.sigma_level(c, sigma)
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
            picture = await cpu_work(pixels, load_image, opened, "image")
            planes, rgb = await cpu_work(pixels, _planes, picture)
            del picture
            out = await self._run_tiled(handle, planes, level, grid_, rows_per_run)
            return await cpu_work(pixels, _denoised_png, out, rgb)

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


# ---- image generation (GAN sampling) -----------------------------------------------------------------

class ImageGeneration(TaskHandler):
    task = "sample"

    def check_values(self, contract: ModelContract, feeds: Tensors) -> None:
        for spec in contract.inputs:
            if spec.name == "class_id":
                ids = feeds[spec.name]
                if ids.size and (ids.min() < 0 or ids.max() >= len(contract.labels)):
                    raise bad_request(spec.name, f"class ids must be in 0..{len(contract.labels) - 1}")
            elif spec.dtype == "float32" and not np.isfinite(feeds[spec.name]).all():
                raise bad_request(spec.name, "values must be finite")

    async def sample(self, handle: ModelHandle, n: int = 16, seed: int | None = None,
                     class_id: int | None = None) -> tuple[bytes, int]:
        """-> (PNG grid of n samples, 8 per row; the seed used). Same seed, same images."""
        c = handle.contract
        n = check_int("n", n, 1, c.limits["max_n"])
        if class_id is not None:
            class_id = check_int("class_id", class_id, 0, len(c.labels) - 1)
        seed = secrets.randbits(63) if seed is None else check_int("seed", seed, 0, 2 ** 63 - 1)
        rng = np.random.default_rng(seed)
        latent = rng.standard_normal((n, c.input("latent").shape[1])).astype(np.float32)
        classes = (np.full(n, class_id) if class_id is not None else np.arange(n) % len(c.labels)).astype(np.int64)
        async with self.budget.reserve(model_cost(c.limits, n), f"{n} samples", "n"):
            images = (await handle.infer({"latent": latent, "class_id": classes}))[c.outputs[0].name][:, 0]
        return encode_png(grid((np.clip(images, 0, 1) * 255 + 0.5).astype(np.uint8), columns=min(n, 8))), seed


# ---- text generation ---------------------------------------------------------------------------------

TEXT_INPUT, TEXT_OUTPUT = "text_input", "text_output"


class TextGeneration(TaskHandler):
    """Text in, text out (native /generate and /generate_stream, OpenAI /v1/completions, OIP
    ``text_input``), all through the model's text engine; or the decoder's own tensors on the Open
    Inference Protocol (through the batcher, like any model)."""

    task = "generate"
    runs_long = True

    def sampling(self, handle: ModelHandle, values: Mapping[str, Any]) -> SamplingParams:
        return parse_sampling(values, handle.contract.limits["max_new_tokens"])

    def check_values(self, contract: ModelContract, feeds: Tensors) -> None:
        vocab = contract.output("logits").shape[-1]
        ids = feeds["input_ids"]
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise bad_request("input_ids", f"token ids must be in 0..{vocab - 1}")
        window = contract.limits["context_window"]
        caches = {a.shape[2] for n, a in feeds.items() if n.startswith("past")}
        if len(caches) > 1:
            raise bad_request("past", f"cache tensors disagree on the past length: {sorted(caches)}")
        past = caches.pop() if caches else 0
        if past + ids.shape[1] > window:
            raise bad_request("input_ids", f"{past} past + {ids.shape[1]} new positions exceed the context window "
                                           f"of {window}")
        mask = feeds["attention_mask"]
        if mask.shape[1] != past + ids.shape[1]:
            raise bad_request("attention_mask", f"{mask.shape[1]} slots given; past + new is {past + ids.shape[1]}")
        positions = feeds["position_ids"]
        if positions.shape != ids.shape:
            raise bad_request("position_ids", f"shape {list(positions.shape)} given, {list(ids.shape)} expected "
                                              "(that of input_ids)")
        if positions.size and (positions.min() < 0 or positions.max() >= window):
            raise bad_request("position_ids", f"positions must be in 0..{window - 1}")

    def submit(self, handle: ModelHandle, requests: list[tuple[str, SamplingParams]]) -> list[Sequence]:
        """Queues generations on the model's engine (all or none); each sequence yields its chunks."""
        return handle.engine.submit(requests)

    async def complete(self, handle: ModelHandle, prompt: str, params: SamplingParams) -> Completion:
        (sequence,) = self.submit(handle, [(prompt, params)])
        return await sequence.complete()

    def extra_tensors(self, contract: ModelContract) -> tuple[list[dict], list[dict]]:
        return ([{"name": TEXT_INPUT, "datatype": "BYTES", "shape": [1]}],
                [{"name": TEXT_OUTPUT, "datatype": "BYTES", "shape": [1]}])

    def text_request(self, handle: ModelHandle, feeds: Tensors, parameters: Mapping[str, Any]) -> tuple[str, SamplingParams]:
        """An OIP ``text_input`` request -> (prompt, sampling parameters)."""
        extra = [n for n in feeds if n != TEXT_INPUT]
        if extra:
            raise bad_request(extra[0], f"{TEXT_INPUT} is used alone; do not send model tensors with it")
        tensor = feeds[TEXT_INPUT]
        if tensor.dtype != BYTES_DTYPE:
            raise bad_request(TEXT_INPUT, f"datatype {DTYPES.get(tensor.dtype.name, tensor.dtype.name)} given, "
                                          f"BYTES expected")
        if tensor.shape not in ((1,), (1, 1)):
            raise bad_request(TEXT_INPUT, f"shape {list(tensor.shape)} given, [1] or [1, 1] expected")
        try:
            prompt = bytes(tensor.ravel()[0]).decode("utf-8")
        except UnicodeDecodeError:
            raise bad_request(TEXT_INPUT, "prompt is not valid UTF-8") from None
        return prompt, self.sampling(handle, parameters)

    @staticmethod
    def text_result(text: str, shape: tuple[int, ...], parameters: dict[str, Any]) -> TensorResult:
        tensor = np.empty(shape, dtype=object)
        tensor.ravel()[0] = text.encode("utf-8")
        return TensorResult({TEXT_OUTPUT: tensor}, parameters)

    async def infer_tensors(self, handle: ModelHandle, feeds: Tensors, parameters: Mapping[str, Any]) -> TensorResult:
        if TEXT_INPUT not in feeds:
            return await super().infer_tensors(handle, feeds, parameters)
        prompt, params = self.text_request(handle, feeds, parameters)
        done = await self.complete(handle, prompt, params)
        return self.text_result(done.text, feeds[TEXT_INPUT].shape, finish_parameters(done, params.seed))

    async def stream_tensors(self, handle: ModelHandle, feeds: Tensors,
                             parameters: Mapping[str, Any]) -> AsyncIterator[TensorResult]:
        """Decoupled inference (gRPC ModelStreamInfer): one result per text chunk, the last one with
        the finish reason. Checks the request before returning, so bad input fails the call."""
        if TEXT_INPUT not in feeds:
            return await super().stream_tensors(handle, feeds, parameters)
        prompt, params = self.text_request(handle, feeds, parameters)
        (sequence,) = self.submit(handle, [(prompt, params)])
        shape = feeds[TEXT_INPUT].shape

        async def results() -> AsyncIterator[TensorResult]:
            async for chunk in sequence.chunks():
                extra = {} if chunk.finish_reason is None else finish_parameters(chunk, params.seed)
                result = self.text_result(chunk.text, shape, extra)
                result.final = chunk.finish_reason is not None
                yield result

        return results()


def finish_parameters(done: Completion | Chunk, seed: int) -> dict[str, Any]:
    """The response parameters of a finished OIP text request."""
    return {"finish_reason": done.finish_reason, "seed": seed, "prompt_tokens": done.prompt_tokens,
            "completion_tokens": done.completion_tokens}


HANDLERS: dict[str, type[TaskHandler]] = {h.task: h for h in (ImageClassification, Segmentation, Denoising,
                                                                ImageGeneration, TextGeneration)}

