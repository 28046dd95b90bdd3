"""The serving contract of a model: the one description that training writes, export embeds in the
ONNX file (``metadata_props["contract"]``) and services, tests and load tests read back.

Torch-free on purpose: serving imports this module and nothing from ``training``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

CONTRACT_KEY = "contract"
ONNX_FILE = "model.onnx"

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
    """How an uploaded picture becomes the model's input tensor."""

    height: int  # size the service resizes to (training size); 0 = keep the upload's size
    width: int
    channels: int  # 1 = grayscale, 3 = RGB
    mean: float = 0.0  # applied after scaling pixels to [0, 1]
    std: float = 1.0
    foreground: str = "light"  # "light": strokes brighter than background (digits, MNIST)
    multiple_of: int = 1  # spatial sizes the network accepts (U-Net pooling)


@dataclass(frozen=True)
class ModelContract:
    name: str  # model name in the BentoML store and on every protocol
    family: str  # classify | segment | generate | denoise | sample
    task: str
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
