"""The serving contract of a model: the one description that training writes, export embeds in the
ONNX file (``metadata_props["contract"]``) and services, tests and load tests read back.

Torch-free on purpose: serving imports this module and nothing from ``training``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

CONTRACT_KEY = "contract"
ONNX_FILE = "model.onnx"
# A model's name in the store and on every API (a BentoML model name): training, export, imports and
# serving all check names with this one pattern (``MODEL_NAME.fullmatch(name)``).
MODEL_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")

# The one datatype table: numpy dtype name <-> Open Inference Protocol datatype. Every layer (contract,
# codecs, metadata, gRPC) reads it; BYTES tensors are numpy object arrays of ``bytes``.
DTYPES = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
    "object": "BYTES",
}
NUMPY_DTYPES = {oip: numpy for numpy, oip in DTYPES.items()}  # OIP datatype -> numpy dtype name


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor; ``-1`` marks a dynamic axis, ``axis_names`` says what it stands for."""

    name: str
    dtype: str  # numpy dtype name
    shape: list[int]
    axis_names: list[str] = field(default_factory=list)
    description: str = ""

    @property
    def oip_datatype(self) -> str:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class ImageSpec:
    """How an uploaded picture becomes the model's input tensor: the steps of the model's own image
    processor, so serving cannot drift from training (or, for an imported model, from the
    preprocessing its authors ship in ``preprocessor_config.json``)."""

    height: int  # size the service resizes to (training size); 0 = keep the upload's size
    width: int
    channels: int  # 1 = grayscale, 3 = RGB
    mean: float | list[float] = 0.0  # applied after rescaling; one value, or one per channel
    std: float | list[float] = 1.0
    foreground: str = "light"  # "light": strokes brighter than background (digits, MNIST); "any": never flipped
    multiple_of: int = 1  # spatial sizes the network accepts (U-Net pooling)
    resize: str = "exact"  # "exact": to height x width; "shortest_edge": the short side to resize_to, then the
    #   centre height x width crop; "none": the upload's size
    resize_to: int = 0  # the short side's length before the crop ("shortest_edge")
    resample: str = "bilinear"  # nearest | bilinear | bicubic | lanczos (Pillow's filters)
    rescale: float = 1 / 255  # pixel values (0-255) times this, before mean/std
    layout: str = "NCHW"  # or "NHWC"
    dtype: str = "float32"  # the input tensor's; "uint8": the pixels as they are (no rescale, no mean/std)
    pad_to: int = 0  # pad bottom and right (mirrored) to the next multiple of this above each side (Swin2SR's
    #   processor: a side that already is a multiple still gains pad_to); the padding is cropped off the answer
    shrink_early: bool = True  # shrink a large upload right after decoding (bounded memory); False where the
    #   preprocessing must see every decoded pixel to match the model's own image processor exactly


@dataclass(frozen=True)
class ModelContract:
    name: str  # model name in the BentoML store and on every protocol
    family: str  # what produced it: a training family (classify, segment, ...) or an import (onnx, torch, huggingface)
    task: str  # what it serves: image-classification, semantic-segmentation, text-generation, image-denoising,
    #   image-generation, image-to-image, tensor (services/tasks registers one handler per task)
    architecture: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    image: ImageSpec | None = None
    labels: list[str] = field(default_factory=list)
    limits: dict[str, int] = field(default_factory=dict)  # request caps the service enforces
    extra: dict[str, Any] = field(default_factory=dict)  # family specifics (tokenizer file, latent size…)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelContract":
        raw = json.loads(text)
        raw["inputs"] = [TensorSpec(**t) for t in raw["inputs"]]
        raw["outputs"] = [TensorSpec(**t) for t in raw["outputs"]]
        if raw.get("image") is not None:
            raw["image"] = ImageSpec(**raw["image"])
        return cls(**raw)

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)

    @property
    def max_batch(self) -> int | None:
        """Rows one request may carry (a generator's ``max_n`` is its batch), None = no limit."""
        return self.limits.get("max_batch") or self.limits.get("max_n")
