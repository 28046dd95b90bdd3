"""What the serving image path holds per pixel of an upload, at its peak, without the model's graph:
the figures behind ``services/budget.py``'s DECODE_BYTES_PER_PIXEL (models that take the upload's
size: decode, float planes in and out, PNG encode) and DECODE_BYTES_PER_PIXEL_SHRUNK (models of a
fixed input size: the picture is shrunk right after decoding).

    python -m services.bench_decode

Each case runs in this process, with the allocator tuned as a serving worker tunes it, freed memory
given back and the kernel's high-water mark reset first (``/proc/self/clear_refs``), and prints
bytes per pixel above the resting RSS. A benchmark of serving's own decode path, so it lives
beside it (as training/bench_threads.py beside training)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def photo_png(width: int, height: int, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).resize((width, height))
    image = coarse.convert(mode) if mode != "P" else coarse.quantize(16)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def main() -> None:
    from common.imaging import load_image, open_image, to_model_input
    from common.resources import peak_above_rest
    from contract import ImageSpec
    from services.budget import give_back_memory, tune_allocator
    from services.tasks.denoise import _denoised_png, _planes

    def native(data: bytes) -> None:  # /denoise: planes in, the same planes out, the PNG answer
        picture = load_image(open_image(data, "image", 10 ** 8), "image")
        planes, rgb = _planes(picture)
        del picture
        _denoised_png(planes.copy(), rgb)

    def shrunk(data: bytes) -> None:  # /classify: shrunk right after decoding, then resized
        picture = load_image(open_image(data, "image", 10 ** 8), "image", (28, 28))
        to_model_input(picture, ImageSpec(28, 28, 1))

    tune_allocator()  # as each serving worker does
    cases = [("native RGB PNG 2000x2000", native, photo_png(2000, 2000)),
             ("native gray PNG 2000x2000", native, photo_png(2000, 2000, "L")),
             ("shrunk RGB PNG 4000x3000", shrunk, photo_png(4000, 3000)),
             ("shrunk palette PNG 4000x4000", shrunk, photo_png(4000, 4000, "P"))]
    print("| path | bytes per pixel at the peak |\n| --- | --- |")
    for label, path, data in cases:
        path(data)  # once first: lazily loaded codecs are not the request's cost
        pixels = Image.open(io.BytesIO(data)).size
        give_back_memory()  # what an earlier case freed is not counted as this one's rest
        print(f"| {label} | {peak_above_rest(lambda: path(data)) / (pixels[0] * pixels[1]):.1f} |")


if __name__ == "__main__":
    main()
