"""The user's own models, stored as served models: ``python -m export import …`` and
``import_torch_module``.

Sources:

* ``onnx MODEL.onnx --spec SPEC.toml``: an ONNX graph plus a task spec saying how to feed it
  (the task; the input's name, layout, size, colour mode, rescale, mean/std; labels, classes,
  noise range). The spec is checked against the graph before anything is written.
* ``huggingface FOLDER``: a transformers folder (``save_pretrained``) for image classification,
  semantic segmentation or image-to-image; the preprocessing comes from its
  ``preprocessor_config.json``, the labels from ``config.json``'s ``id2label``; exported with the
  suite's own export routine (``export.onnx_export.export_module``) and its parity gate.
* ``tensor MODEL.onnx``: any ONNX graph, served as it is over the Open Inference Protocol: inputs,
  outputs, datatypes and dynamic axes read from the graph; batched when the first axis is dynamic.
* ``import_torch_module(module, example, spec)`` (Python): a torch module, exported like the above.

Every import gets what a trained model gets: the contract in the artifact, a parity gate (ONNX
Runtime against the source), the graph's memory per pixel or row measured, an atomic write, and a
new version in the model store. A bad import is one ``ImportRefused`` naming what does not fit;
nothing is written then."""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.files import atomic_write
from contract import ONNX_FILE, ImageSpec, ModelContract, TensorSpec
from export.importing import (ImportRefused, check_name, default_name, settle_int8_gate, store_import,
                              store_int8_variant)

log = logging.getLogger(__name__)

TASK_NAMES = {"classify": "image-classification", "segment": "semantic-segmentation", "denoise": "image-denoising",
              "super-resolution": "image-to-image"}
IMAGE_TASKS = ("image-classification", "semantic-segmentation", "image-denoising", "image-to-image")
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}  # PIL's codes, as HF configs hold them
# The most pixels an upload may have, per task: fixed-size tasks resize it away; the others run the
# graph at the upload's size (the memory budget bounds them further, from the measured figure).
DEFAULT_MAX_PIXELS = {"image-classification": 16_000_000, "semantic-segmentation": 4_000_000,
                      "image-denoising": 4_000_000, "image-to-image": 1_048_576}
PARITY_TOLERANCE = 1e-4


# ---- the task spec -------------------------------------------------------------------------------

@dataclass
class ImportSpec:
    """How to serve an imported image model; a TOML file's ``task`` plus ``[input]``, ``[output]``
    and ``[limits]`` tables (see ``SPEC_KEYS``)."""

    task: str
    input: str | None = None  # the image input's name; default: the graph's only (or first) input
    layout: str = "NCHW"
    size: tuple[int, int] | None = None  # (height, width) the model takes; None: dynamic
    color: str = "RGB"  # RGB | L
    dtype: str = "float32"  # the input tensor's: float32, or uint8 (raw pixels)
    rescale: float = 1 / 255
    mean: list[float] = field(default_factory=lambda: [0.0])
    std: list[float] = field(default_factory=lambda: [1.0])
    resize: str = "exact"  # exact | shortest_edge (then a centre crop of size)
    resize_to: int = 0
    resample: str = "bilinear"
    pad_to: int = 0
    multiple_of: int = 1
    shrink_early: bool = False  # True: bounded memory for large uploads, at the cost of exact preprocessing
    output: str | None = None  # the answer's output; default: the graph's first
    output_kind: str = ""  # classify: logits | probabilities; segment: scores | mask
    labels: list[str] = field(default_factory=list)
    labels_file: str = ""  # where the labels came from, for error messages
    palette: list[list[int]] = field(default_factory=list)
    noise_range: tuple[float, float] = (0.0, 75.0)  # denoise: sigma on the 0-255 scale the model was trained for
    noise_input: str | None = None  # denoise: the noise-level input, if it has one
    output_range: tuple[float, float] = (0.0, 1.0)  # image-to-image: output values mapped to 0-255
    max_batch: int = 32
    max_pixels: int = 0  # 0: the task's default

    def __post_init__(self) -> None:
        self.task = TASK_NAMES.get(self.task, self.task)
        if self.task not in IMAGE_TASKS:
            raise ImportRefused(f"task {self.task!r}: an image model's spec names one of {list(IMAGE_TASKS)} (or "
                                f"{list(TASK_NAMES)}); any other graph imports as a tensor model")
        for name, value, allowed in (("layout", self.layout, ("NCHW", "NHWC")), ("color", self.color, ("RGB", "L")),
                                     ("dtype", self.dtype, ("float32", "uint8")),
                                     ("resize", self.resize, ("exact", "shortest_edge")),
                                     ("resample", self.resample, tuple(RESAMPLE_NAMES.values()))):
            if value not in allowed:
                raise ImportRefused(f"spec: {name} = {value!r}; one of {list(allowed)}")
        channels = 3 if self.color == "RGB" else 1
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) not in (1, channels):
                raise ImportRefused(f"spec: {name} has {len(values)} values; {self.color} needs {channels} (or one)")
        if any(s == 0 for s in self.std):
            raise ImportRefused("spec: std holds a zero")
        if self.resize == "shortest_edge" and (self.size is None or self.resize_to < max(self.size)):
            raise ImportRefused("spec: resize = 'shortest_edge' needs size (the crop) and resize_to >= its sides")
        if self.max_batch < 1:
            raise ImportRefused("spec: max_batch must be >= 1")


SPEC_KEYS = {
    "": ("task",),
    "input": ("name", "layout", "size", "color", "dtype", "rescale", "mean", "std", "resize", "resize_to", "resample",
              "pad_to", "multiple_of", "shrink_early", "noise_input"),
    "output": ("name", "kind", "labels", "classes", "palette", "noise_range", "range"),
    "limits": ("max_batch", "max_pixels"),
}


def read_spec(path: Path) -> ImportSpec:
    """A TOML task spec; a labels file it names is read relative to it (one label per line)."""
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ImportRefused(f"{path.name}: not a readable TOML file: {exc}") from None
    for table, value in raw.items():
        keys = SPEC_KEYS.get(table if isinstance(value, dict) else "")
        if keys is None:
            raise ImportRefused(f"{path.name}: unknown table [{table}]; tables: {[t for t in SPEC_KEYS if t]}")
        for key in (value if isinstance(value, dict) else {table: value}):
            if key not in keys:
                raise ImportRefused(f"{path.name}: unknown key {key!r} in {f'[{table}]' if isinstance(value, dict) else 'the top level'}; "
                                    f"known: {list(keys)}")
    if "task" not in raw:
        raise ImportRefused(f"{path.name}: no task; say task = \"image-classification\" (or another of {list(IMAGE_TASKS)})")
    inp, out, limits = raw.get("input", {}), raw.get("output", {}), raw.get("limits", {})
    size = inp.get("size")
    if size == "dynamic":
        size = None
    elif size is not None:
        if isinstance(size, int):
            size = [size, size]
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
            raise ImportRefused(f"{path.name}: input.size is [height, width], one side, or \"dynamic\"; got {size!r}")
        size = tuple(size)
    labels = out.get("classes", [])
    if "labels" in out:
        labels_path = path.parent / out["labels"]
        try:
            labels = [line.strip() for line in labels_path.read_text().splitlines() if line.strip()]
        except OSError as exc:
            raise ImportRefused(f"{path.name}: output.labels: cannot read {labels_path.name}: {exc.strerror}") from None
    as_list = lambda v: [float(x) for x in v] if isinstance(v, list) else [float(v)]  # noqa: E731
    fields = dict(task=raw["task"], input=inp.get("name"), layout=inp.get("layout", "NCHW"), size=size,
                  color=inp.get("color", "RGB"), dtype=inp.get("dtype", "float32"),
                  rescale=float(inp.get("rescale", 1 / 255)), mean=as_list(inp.get("mean", 0.0)),
                  std=as_list(inp.get("std", 1.0)), resize=inp.get("resize", "exact"),
                  resize_to=int(inp.get("resize_to", 0)), resample=inp.get("resample", "bilinear"),
                  pad_to=int(inp.get("pad_to", 0)), multiple_of=int(inp.get("multiple_of", 1)),
                  shrink_early=bool(inp.get("shrink_early", False)), noise_input=inp.get("noise_input"),
                  output=out.get("name"), output_kind=out.get("kind", ""), labels=labels,
                  labels_file=Path(out["labels"]).name if "labels" in out else "",
                  palette=out.get("palette", []), noise_range=tuple(out.get("noise_range", (0.0, 75.0))),
                  output_range=tuple(out.get("range", (0.0, 1.0))), max_batch=int(limits.get("max_batch", 32)),
                  max_pixels=int(limits.get("max_pixels", 0)))
    try:
        return ImportSpec(**fields)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ImportRefused):
            raise
        raise ImportRefused(f"{path.name}: {exc}") from None


# ---- what a graph declares -----------------------------------------------------------------------

@dataclass
class GraphTensor:
    name: str
    dtype: str  # numpy dtype name
    shape: list[int]  # -1: dynamic or unknown
    dims: list[str]  # each axis's symbolic name ("" where static or unnamed)


def graph_io(proto) -> tuple[list[GraphTensor], list[GraphTensor]]:
    """The graph's real inputs (initializers left out) and outputs."""
    from onnx import helper

    initializers = {i.name for i in proto.graph.initializer}

    def tensor(value) -> GraphTensor:
        kind = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise ImportRefused(f"{value.name!r} is not a tensor (sequences and maps are not served)")
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(kind.elem_type)).name if kind.elem_type else "float32"
        if dtype not in ("bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
                         "float16", "float32", "float64", "object"):
            raise ImportRefused(f"{value.name!r} has datatype {dtype}, which the Open Inference Protocol cannot carry")
        dims = list(kind.shape.dim) if kind.HasField("shape") else []
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
        return GraphTensor(value.name, dtype, shape, [d.dim_param if d.HasField("dim_param") else "" for d in dims])

    inputs = [tensor(v) for v in proto.graph.input if v.name not in initializers]
    return inputs, [tensor(v) for v in proto.graph.output]


def run_graph(path_or_session, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = path_or_session
    if not isinstance(session, ort.InferenceSession):
        session = ort.InferenceSession(str(path_or_session), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


# ---- image models: the spec against the graph -----------------------------------------------------

def image_contract(name: str, source: str, architecture: str, spec: ImportSpec, inputs: list[GraphTensor],
                   outputs: list[GraphTensor], run) -> ModelContract:
    """The contract of an image model, after checking ``spec`` against the graph's declared inputs
    and outputs and one probe run (``run(feeds) -> outputs``) at the size it will be served at."""
    by_name = {t.name: t for t in inputs}
    image = by_name.get(spec.input) if spec.input else next((t for t in inputs if len(t.shape) == 4), None)
    if image is None:
        raise ImportRefused(f"the spec's input {spec.input!r} is not an input of the graph; it has "
                            f"{[t.name for t in inputs]}" if spec.input else
                            f"the graph has no 4-dimensional (image) input: {[(t.name, t.shape) for t in inputs]}")
    if len(image.shape) != 4:
        raise ImportRefused(f"input {image.name!r} has rank {len(image.shape)} ({image.shape}); an image input has 4")
    channels = 3 if spec.color == "RGB" else 1
    graph_layout = layout_of(image.shape)
    graph_kind = "uint8" if image.dtype == "uint8" else "float" if image.dtype.startswith("float") else image.dtype
    spec_kind = "uint8" if spec.dtype == "uint8" else "float"
    if (graph_layout and graph_layout != spec.layout) or graph_kind != spec_kind:
        raise ImportRefused(f"input {image.name!r} is {graph_layout or spec.layout} {graph_kind} "
                            f"({image.shape}), the spec says {spec.layout} {spec_kind}")
    if image.dtype not in ("float32", "uint8"):
        raise ImportRefused(f"input {image.name!r} is {image.dtype}; an image input is float32 or uint8")
    c_axis, h_axis, w_axis = (1, 2, 3) if spec.layout == "NCHW" else (3, 1, 2)
    if image.shape[c_axis] not in (-1, channels):
        raise ImportRefused(f"input {image.name!r} takes {image.shape[c_axis]} channels; the spec says "
                            f"{spec.color} ({channels})")
    fixed = (image.shape[h_axis], image.shape[w_axis])
    if spec.size is None and -1 not in fixed:
        spec = dataclasses.replace(spec, size=fixed)
    if spec.size is not None and any(g not in (-1, s) for g, s in zip(fixed, spec.size)):
        raise ImportRefused(f"input {image.name!r} is {fixed[0]}x{fixed[1]}; the spec says "
                            f"{spec.size[0]}x{spec.size[1]}")
    if spec.task == "image-classification" and spec.size is None:
        raise ImportRefused(f"input {image.name!r} has a dynamic size: a classifier's spec gives input.size")
    batched = image.shape[0] == -1
    noise = None
    extra_inputs = [t for t in inputs if t.name != image.name]
    if spec.task == "image-denoising":
        if channels != 1:
            raise ImportRefused("the denoise task runs one channel per row (colour as three rows); this spec takes "
                                "RGB: import the graph as image-to-image instead")
        noise = by_name.get(spec.noise_input) if spec.noise_input else (extra_inputs[0] if extra_inputs else None)
        if spec.noise_input and noise is None:
            raise ImportRefused(f"the spec's noise_input {spec.noise_input!r} is not an input of the graph")
        if noise is not None and (len(noise.shape) != 2 or noise.shape[1] not in (-1, 1) or noise.dtype != "float32"):
            raise ImportRefused(f"noise input {noise.name!r} is {noise.dtype} {noise.shape}; the denoise task feeds "
                                f"float32 (batch, 1): sigma / 255")
        extra_inputs = [t for t in extra_inputs if noise is None or t.name != noise.name]
    if extra_inputs:
        raise ImportRefused(f"the graph has inputs the {spec.task} task cannot feed: {[t.name for t in extra_inputs]}; "
                            f"import it as a tensor model")
    out = next((t for t in outputs if t.name == spec.output), None) if spec.output else outputs[0]
    if out is None:
        raise ImportRefused(f"the spec's output {spec.output!r} is not an output of the graph; it has "
                            f"{[t.name for t in outputs]}")

    # One probe run at the size requests will have (and at two rows where the batch is dynamic).
    side = spec.size or (64, 64)
    shape = [2 if batched else max(1, image.shape[0]), 0, 0, 0]
    shape[c_axis], shape[h_axis], shape[w_axis] = channels, *side
    feeds = {image.name: np.zeros(shape, dtype=image.dtype)}
    if noise is not None:
        feeds[noise.name] = np.full((shape[0], 1), 25 / 255, np.float32)
    try:
        got = dict(zip([t.name for t in outputs], run(feeds)))[out.name]
    except Exception as exc:  # noqa: BLE001 - the graph's own error says what it wanted
        raise ImportRefused(f"the graph does not run on {image.name} {shape} {image.dtype}: "
                            f"{str(exc).strip().splitlines()[0][:300]}") from None
    if batched and (got.ndim == 0 or got.shape[0] != shape[0]):
        raise ImportRefused(f"output {out.name!r} does not keep the batch axis ({list(got.shape)} for {shape[0]} rows)")

    extra: dict[str, Any] = {"source": source}
    labels = list(spec.labels)
    out_shape = [-1 if batched else got.shape[0], *got.shape[1:]]
    if spec.task == "image-classification":
        if got.ndim != 2:
            raise ImportRefused(f"output {out.name!r} is {list(got.shape)}; a classifier outputs (batch, classes)")
        classes = got.shape[1]
        if labels and len(labels) != classes:
            raise ImportRefused(f"{spec.labels_file or 'the spec labels'} has {len(labels)} "
                                f"{'lines' if spec.labels_file else 'entries'}, the graph outputs {classes} classes")
        labels = labels or [str(i) for i in range(classes)]
        kind = spec.output_kind or "logits"
        if kind not in ("logits", "probabilities"):
            raise ImportRefused(f"output.kind = {kind!r}: a classifier's is logits or probabilities")
        extra["outputs_probabilities"] = kind == "probabilities"
        out_axes = ["batch", "class"]
    elif spec.task == "semantic-segmentation":
        scores = got.dtype.kind == "f"
        if (scores and got.ndim != 4) or (not scores and got.ndim != 3):
            raise ImportRefused(f"output {out.name!r} is {got.dtype} {list(got.shape)}; a segmenter outputs class "
                                f"scores (batch, classes, h, w) or a mask of class ids (batch, height, width)")
        if scores:
            classes = got.shape[1]
            if labels and len(labels) != classes:
                raise ImportRefused(f"the spec names {len(labels)} classes, the graph outputs {classes}")
            labels = labels or [str(i) for i in range(classes)]
            if spec.size is None:
                out_shape[2:] = [-1, -1]
            out_axes = ["batch", "class", "score_height", "score_width"]
        else:
            if spec.size is None:
                out_shape[1:] = [-1, -1]
            out_axes = ["batch", "height", "width"]
            if not labels:
                raise ImportRefused("a mask-output segmenter's spec lists its classes (output.classes)")
        if spec.palette:
            extra["palette"] = spec.palette
    elif spec.task == "image-denoising":
        if list(got.shape) != shape:
            raise ImportRefused(f"output {out.name!r} is {list(got.shape)} for an input of {shape}; a denoiser "
                                f"answers at its input's size")
        out_shape, out_axes = [-1 if batched else 1, 1, -1, -1], ["batch", "channel", "height", "width"]
        extra["blind_level"] = -1.0
        extra["noise_input"] = noise is not None
    else:  # image-to-image
        if got.ndim != 4:
            raise ImportRefused(f"output {out.name!r} is {list(got.shape)}; an image-to-image model outputs an image")
        extra["scale"] = got.shape[h_axis] / side[0]  # the probe fed the graph side x side itself
        extra["output_range"] = list(spec.output_range)
        if spec.size is None:
            out_shape[h_axis], out_shape[w_axis] = -1, -1
        out_axes = ["batch", "channel", "height", "width"] if spec.layout == "NCHW" else ["batch", "height", "width",
                                                                                          "channel"]
    image_axes = (["batch", "channel", "height", "width"] if spec.layout == "NCHW"
                  else ["batch", "height", "width", "channel"])
    in_shape = [-1 if batched else image.shape[0], 0, 0, 0]
    in_shape[c_axis] = channels
    in_shape[h_axis], in_shape[w_axis] = spec.size if spec.size is not None else (-1, -1)
    tensors_in = [TensorSpec(image.name, image.dtype, in_shape, image_axes, "the picture, preprocessed")]
    if noise is not None:
        tensors_in.append(TensorSpec(noise.name, "float32", [-1 if batched else 1, 1], ["batch", "level"],
                                     "sigma / 255, or -1 for blind"))
    max_pixels = spec.max_pixels or DEFAULT_MAX_PIXELS[spec.task]
    min_side = max(spec.multiple_of, 8) if spec.size is None else 1
    limits = {"max_batch": spec.max_batch if batched else 1, "max_pixels": max_pixels, "min_side": min_side}
    if spec.task == "image-denoising":
        limits["max_sigma"] = int(spec.noise_range[1])
    if spec.resize == "shortest_edge":
        height, width = spec.size
    else:
        height, width = spec.size if spec.size is not None else (0, 0)
    image_spec = ImageSpec(height=height, width=width, channels=channels,
                           mean=spec.mean[0] if len(spec.mean) == 1 else list(spec.mean),
                           std=spec.std[0] if len(spec.std) == 1 else list(spec.std), foreground="any",
                           multiple_of=spec.multiple_of, resize=spec.resize if spec.size is not None else "none",
                           resize_to=spec.resize_to, resample=spec.resample, rescale=spec.rescale,
                           layout=spec.layout, dtype=spec.dtype, pad_to=spec.pad_to, shrink_early=spec.shrink_early)
    return ModelContract(name=name, family=source, task=spec.task, architecture=architecture, inputs=tensors_in,
                         outputs=[TensorSpec(out.name, str(got.dtype), out_shape, out_axes)], image=image_spec,
                         labels=labels, limits=limits, extra=extra)


def layout_of(shape: list[int]) -> str:
    """NCHW or NHWC from where a channel count (1, 3 or 4) sits, or "" when the shape cannot say."""
    first, last = shape[1] in (1, 3, 4), shape[3] in (1, 3, 4)
    if first and not last:
        return "NCHW"
    if last and not first:
        return "NHWC"
    return ""


# ---- storing -------------------------------------------------------------------------------------

def write_graph(proto, contract: ModelContract, out_path: Path, reference: Path, tolerance: float = 0.0) -> tuple[ModelContract, float]:
    """An ONNX graph as it is, with the contract in its metadata: written atomically after
    ``onnx.checker``, ONNX Runtime on the written file against the original file (the same
    outputs, or nothing is written), and the memory measurement."""
    import onnx

    from export.onnx_export import finish_artifact

    try:
        onnx.checker.check_model(proto, full_check=False)
    except onnx.checker.ValidationError as exc:
        raise ImportRefused(f"not a valid ONNX graph: {str(exc).splitlines()[0][:300]}") from None
    done: list = []

    def check(session) -> float:
        feeds = probe_feeds(contract)
        expected = run_graph(reference, feeds)
        got = session.run(None, feeds)
        return max((float(np.max(np.abs(e.astype(np.float64) - g.astype(np.float64)))) if e.size and e.dtype != object
                    else 0.0 for e, g in zip(expected, got)), default=0.0)

    atomic_write(out_path, lambda tmp: done.extend(finish_artifact(proto, contract, {}, tmp, check, tolerance)))
    return done[0], done[1]


def probe_feeds(contract: ModelContract, rows: int = 2) -> dict[str, np.ndarray]:
    """Inputs for a check run: random values (zeros for integers) at the contract's shapes, dynamic
    axes at ``rows`` for the batch, 64 for image sides and 4 elsewhere."""
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in contract.inputs:
        shape = [d if d >= 0 else rows if axis == "batch" else 64 if axis in ("height", "width") else 4
                 for d, axis in zip(spec.shape, spec.axis_names or [""] * len(spec.shape))]
        if spec.dtype.startswith("float"):
            feeds[spec.name] = rng.random(shape).astype(spec.dtype)
        elif spec.dtype == "object":
            feeds[spec.name] = np.full(shape, b"", dtype=object)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return feeds


# ---- the sources ---------------------------------------------------------------------------------

def load_graph(path: Path):
    """-> (the ONNX proto, its inputs, its outputs); ImportRefused when it cannot be read."""
    import onnx

    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001
        raise ImportRefused(f"{path.name}: not a readable ONNX file: {exc}") from None
    return (proto, *graph_io(proto))


def import_onnx(path: Path, spec: ImportSpec, name: str | None = None, store: bool = True) -> tuple[ModelContract, str | None]:
    """An ONNX image model plus its task spec -> (contract, store tag)."""
    name = check_name(name or default_name(path))
    proto, inputs, outputs = load_graph(path)
    contract = image_contract(name, "onnx", architecture_of(proto, path), spec, inputs, outputs,
                              lambda feeds: run_graph(path, feeds))
    return finish_onnx(proto, contract, path, {"from": path.name, "spec": dataclasses.asdict(spec)}, store)


def import_tensor_model(path: Path, name: str | None = None, max_batch: int = 32, store: bool = True) -> tuple[ModelContract, str | None]:
    """Any ONNX graph as a plain tensor model: inputs, outputs, datatypes and dynamic axes from the
    graph. Batched (up to ``max_batch`` rows a run) when every input's and output's first axis is
    dynamic and a probe run at two rows keeps it; else one request per run."""
    name = check_name(name or default_name(path))
    proto, inputs, outputs = load_graph(path)
    if not inputs or not outputs:
        raise ImportRefused(f"{path.name}: the graph has no inputs or no outputs")
    batched = all(t.shape[:1] == [-1] for t in inputs) and all(t.shape[:1] in ([-1], []) for t in outputs)

    def axes(t: GraphTensor, batch: bool) -> list[str]:
        names = [d or (f"axis{i}" if s < 0 else f"dim{i}") for i, (s, d) in enumerate(zip(t.shape, t.dims))]
        return (["batch", *names[1:]] if batch and names else names)

    contract = ModelContract(
        name=name, family="onnx", task="tensor", architecture=architecture_of(proto, path),
        inputs=[TensorSpec(t.name, t.dtype, t.shape, axes(t, batched)) for t in inputs],
        outputs=[TensorSpec(t.name, t.dtype, t.shape if t.shape else [-1], axes(t, batched)) for t in outputs],
        limits={"max_batch": max_batch} if batched else {"max_batch": 1}, extra={"source": "onnx"})
    if batched:
        try:
            got = run_graph(path, probe_feeds(contract, rows=2))
        except Exception as exc:  # noqa: BLE001
            raise ImportRefused(f"{path.name}: the graph does not run on a probe input "
                                f"({str(exc).strip().splitlines()[0][:300]}); inputs: "
                                f"{[(t.name, t.dtype, t.shape) for t in inputs]}") from None
        if not all(g.ndim and g.shape[0] == 2 for g in got):
            log.info("%s: an output does not keep the batch axis; served one request per run", name)
            contract = dataclasses.replace(
                contract, inputs=[dataclasses.replace(t, axis_names=axes(g, False)) for t, g in zip(contract.inputs, inputs)],
                outputs=[dataclasses.replace(t, axis_names=axes(g, False)) for t, g in zip(contract.outputs, outputs)],
                limits={"max_batch": 1})
        else:
            contract = dataclasses.replace(contract, outputs=[
                dataclasses.replace(t, shape=[-1, *g.shape[1:]] if not t.shape else t.shape)
                for t, g in zip(contract.outputs, got)])
    return finish_onnx(proto, contract, path, {"from": path.name}, store)


def architecture_of(proto, path: Path) -> str:
    return proto.producer_name and f"{proto.producer_name} graph ({path.name})" or f"onnx graph ({path.name})"


def finish_onnx(proto, contract: ModelContract, source: Path, origin: dict, store: bool) -> tuple[ModelContract, str | None]:
    with tempfile.TemporaryDirectory(prefix="suite-import-") as folder:
        out = Path(folder) / ONNX_FILE
        contract, diff = write_graph(proto, contract, out, source)
        tag = store_import(contract, out, diff, origin) if store else None
    log.info("%s: imported (%s), parity %.2e%s", contract.name, contract.task, diff, f", stored as {tag}" if tag else "")
    return contract, tag


def import_torch_module(module, example_input, spec: ImportSpec | dict, name: str, store: bool = True,
                        input_name: str = "pixel_values", output_name: str = "output",
                        architecture: str | None = None, source: str = "torch") -> tuple[ModelContract, str | None]:
    """A torch ``nn.Module`` taking one image tensor (``example_input``: a batch of two rows at the
    size it serves) exported with the suite's own export routine and parity gate, then stored.
    Height and width are exported dynamic when the spec's size is not fixed."""
    import torch

    from export.onnx_export import export_module
    from training.family import ExportSpec

    if isinstance(spec, dict):
        spec = ImportSpec(**spec)
    name = check_name(name)
    module = module.eval()
    example = example_input if example_input.shape[0] >= 2 else example_input.repeat(2, 1, 1, 1)
    with torch.no_grad():
        out = module(example)
    if not isinstance(out, torch.Tensor):
        raise ImportRefused(f"the module returns {type(out).__name__}; wrap it to return one tensor")
    h_axis, w_axis = (2, 3) if spec.layout == "NCHW" else (1, 2)
    batch = torch.export.Dim("batch", min=1, max=max(2, spec.max_batch))
    dynamic = {0: batch}
    if spec.size is None:
        dynamic[h_axis] = torch.export.Dim("height", min=8, max=4096)
        dynamic[w_axis] = torch.export.Dim("width", min=8, max=4096)
    inputs = [GraphTensor(input_name, str(example.dtype).removeprefix("torch."),
                          [-1 if i in dynamic else s for i, s in enumerate(example.shape)], [""] * 4)]
    outputs = [GraphTensor(output_name, str(out.dtype).removeprefix("torch."), [-1, *out.shape[1:]], [""] * out.ndim)]

    def run(feeds):
        with torch.no_grad():
            return [module(torch.from_numpy(feeds[input_name])).numpy()]

    spec = dataclasses.replace(spec, input=input_name, output=output_name)
    contract = image_contract(name, source, architecture or type(module).__name__, spec, inputs, outputs, run)
    generator = torch.Generator().manual_seed(0)
    parity_inputs = [(torch.rand(example.shape, generator=generator).to(example.dtype),)]
    if spec.size is None:  # a second size, so the dynamic axes are checked too
        other = list(example.shape)
        other[h_axis] += 8
        other[w_axis] += 16
        parity_inputs.append((torch.rand(other, generator=generator).to(example.dtype),))
    export = ExportSpec(module, (example,), [input_name], [output_name], ({**dynamic},), parity_inputs)
    with tempfile.TemporaryDirectory(prefix="suite-import-") as folder:
        path = Path(folder) / ONNX_FILE
        try:
            contract, diff = export_module(export, contract, {"family": source}, path, PARITY_TOLERANCE)
        except Exception as exc:  # noqa: BLE001 - torch.export's errors are long; the first line says what
            if isinstance(exc, ImportRefused):
                raise
            raise ImportRefused(f"exporting {contract.architecture} failed: {type(exc).__name__}: "
                                f"{str(exc).strip().splitlines()[0][:400]}") from exc
        tag = store_import(contract, path, diff, {"from": architecture or type(module).__name__,
                                                 "spec": dataclasses.asdict(spec)}) if store else None
    log.info("%s: imported %s (%s), parity %.2e%s", name, contract.architecture, contract.task, diff,
             f", stored as {tag}" if tag else "")
    return contract, tag


# ---- Hugging Face transformers folders ---------------------------------------------------------------

HF_TASKS = {"ForImageClassification": ("image-classification", "logits"),
            "ForSemanticSegmentation": ("semantic-segmentation", "logits"),
            "ForImageSuperResolution": ("image-to-image", "reconstruction")}


def huggingface_spec(folder: Path) -> tuple[str, str, ImportSpec]:
    """(architecture class, output attribute, spec) from a ``save_pretrained`` folder's
    config.json and preprocessor_config.json."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ImportRefused(f"{folder.name}: no readable config.json ({exc})") from None
    architecture = (config.get("architectures") or [""])[0]
    task = next(((t, attr) for suffix, (t, attr) in HF_TASKS.items() if architecture.endswith(suffix)), None)
    if task is None:
        raise ImportRefused(f"{folder.name}: architecture {architecture or '(none)'} is not an image classifier, "
                            f"segmenter or image-to-image model ({', '.join('*' + s for s in HF_TASKS)})")
    (task, attribute) = task
    try:
        pre = json.loads((folder / "preprocessor_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ImportRefused(f"{folder.name}: no readable preprocessor_config.json ({exc}); save the image "
                            "processor with the model") from None
    unsupported = [k for k in ("do_flip_channel_order", "do_color_quantize") if pre.get(k)]
    if unsupported:
        raise ImportRefused(f"{folder.name}: preprocessor step {unsupported[0]} is not supported")
    size, resize, resize_to = pre.get("size") or {}, "exact", 0
    if isinstance(size, int):
        size = {"shortest_edge": size}
    if not pre.get("do_resize", task != "image-to-image"):
        hw = None
    elif "height" in size and "width" in size:
        hw = (size["height"], size["width"])
    elif "shortest_edge" in size:
        edge = size["shortest_edge"]
        crop_pct = pre.get("crop_pct")
        if crop_pct is not None:  # ConvNeXt's processor (ResNet's too): resize then crop below 384
            hw, resize, resize_to = ((edge, edge), "shortest_edge", int(edge / crop_pct)) if edge < 384 else \
                ((edge, edge), "exact", 0)
        else:
            crop = pre.get("crop_size") if pre.get("do_center_crop") else None
            if not crop:
                raise ImportRefused(f"{folder.name}: size {size} without a crop gives the model a different size "
                                    "per picture; not supported")
            crop = crop if isinstance(crop, dict) else {"height": crop, "width": crop}
            hw, resize, resize_to = (crop["height"], crop["width"]), "shortest_edge", edge
    else:
        raise ImportRefused(f"{folder.name}: preprocessor size {size} is not understood")
    if pre.get("do_center_crop") and resize == "exact" and hw is not None and pre.get("crop_size"):
        crop = pre["crop_size"]
        crop = crop if isinstance(crop, dict) else {"height": crop, "width": crop}
        if (crop["height"], crop["width"]) != hw:
            raise ImportRefused(f"{folder.name}: a resize to {hw} followed by a crop to {crop} is not supported")
    normalize = pre.get("do_normalize", task != "image-to-image")
    spec = ImportSpec(
        task=task, size=hw, resize=resize, resize_to=resize_to,
        resample=RESAMPLE_NAMES.get(pre.get("resample", 2), "bilinear"),
        rescale=float(pre.get("rescale_factor", 1 / 255)) if pre.get("do_rescale", True) else 1.0,
        mean=list(pre.get("image_mean", [0.0])) if normalize else [0.0],
        std=list(pre.get("image_std", [1.0])) if normalize else [1.0],
        pad_to=int(pre.get("size_divisor") or pre.get("pad_size") or 8) if pre.get("do_pad") and task == "image-to-image"
        else 0,
        output_kind="logits" if task == "image-classification" else "",
        labels=[str(config["id2label"][str(i)]) for i in range(len(config["id2label"]))] if config.get("id2label")
        and task != "image-to-image" else [])
    return architecture, attribute, spec


def import_huggingface(folder: Path, name: str | None = None, store: bool = True,
                       max_batch: int = 32, **text_options) -> tuple[ModelContract, str | None]:
    """A transformers folder -> (contract, store tag), exported by the suite's own export routine
    with its parity gate: an image model here, a causal LM by ``export.causal_lm`` (which takes
    ``text_options``: context_window, max_new_tokens)."""
    import torch
    import transformers

    from export.causal_lm import import_causal_lm, is_causal_lm

    if is_causal_lm(folder):
        return import_causal_lm(folder, name, store, max_batch=max(max_batch, 1), **text_options)
    architecture, attribute, spec = huggingface_spec(folder)
    spec = dataclasses.replace(spec, max_batch=max_batch)
    model_class = getattr(transformers, architecture, None)
    if model_class is None:
        raise ImportRefused(f"{folder.name}: transformers {transformers.__version__} has no {architecture}")
    try:
        model = model_class.from_pretrained(str(folder), local_files_only=True).eval()
    except Exception as exc:  # noqa: BLE001
        raise ImportRefused(f"{folder.name}: transformers could not load it: {str(exc).splitlines()[0][:300]}") from None

    class Output(torch.nn.Module):
        """The model's one tensor the task reads (logits, reconstruction)."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            return getattr(self.model(pixel_values=pixel_values), attribute)

    side = spec.size or (32, 48)
    example = torch.rand(2, 3, *side, generator=torch.Generator().manual_seed(0))
    return import_torch_module(Output(model), example, spec, check_name(name or default_name(folder)), store,
                               input_name="pixel_values", output_name=attribute,
                               architecture=getattr(model.config, "model_type", architecture), source="huggingface")


# ---- int8 variants, gated by agreement with fp32 on the user's own images ---------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def calibration_feeds(contract: ModelContract, folder: Path, limit: int = 64) -> list[dict[str, np.ndarray]]:
    """The images in ``folder`` (up to ``limit``, sorted by name), each preprocessed as serving
    preprocesses an upload of it: one feed per image."""
    from PIL import Image

    from common.imaging import load_image, to_model_input

    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit] if folder.is_dir() else []
    if len(paths) < 4:
        raise ImportRefused(f"{folder}: {len(paths)} images ({', '.join(IMAGE_SUFFIXES)}); the int8 gate needs at "
                            "least 4 to calibrate and measure on")
    feeds = []
    for path in paths:
        picture = load_image(Image.open(path), "image")
        if contract.task == "image-denoising":
            picture = picture.convert("L")
        x = to_model_input(picture, contract.image)
        feed = {contract.inputs[0].name: x}
        if len(contract.inputs) > 1:  # a denoiser's noise level: blind
            feed[contract.inputs[1].name] = np.full((1, 1), contract.extra.get("blind_level", -1.0), np.float32)
        feeds.append(feed)
    return feeds


def agreement(task: str, fp32: np.ndarray, variant: np.ndarray, value_range: tuple[float, float]) -> float:
    """The share of the answer the variant gives as fp32 does: the same class (classify), the same
    class per pixel (segment), the same 8-bit pixel value within one level (image outputs)."""
    if task == "image-classification":
        return float(np.mean(fp32.argmax(-1) == variant.argmax(-1)))
    if task == "semantic-segmentation":
        if fp32.dtype.kind == "f":
            return float(np.mean(fp32.argmax(1) == variant.argmax(1)))
        return float(np.mean(fp32 == variant))
    low, high = value_range
    scale = 255 / (high - low)
    return float(np.mean(np.abs(np.clip((fp32 - low) * scale, 0, 255) - np.clip((variant - low) * scale, 0, 255)) <= 1.0))


def import_int8(name: str, calibration: Path, min_agreement: float = 0.99, store: bool = True, max_loss: float = 0.02):
    """``<name>-int8``: ONNX Runtime's static int8 quantization of the stored model ``name``,
    calibrated on the images in ``calibration`` and kept only when its answers agree with fp32's
    on at least ``min_agreement`` of them and it runs faster than fp32 here; else ``VariantRefused``
    with the figures. A text model's variant is dynamic int8, gated by its next-token loss on the
    text file ``calibration`` (within ``max_loss`` nats/token; export.causal_lm). -> (the gate, the
    store tag or None)."""
    import bentoml
    from bentoml.exceptions import NotFound

    from common.runtime import OnnxSession, read_contract
    from export.variants import Gate, _median_ms, _with_contract, quantize_int8

    if not 0 < min_agreement <= 1:
        raise ImportRefused(f"--min-agreement {min_agreement}: a share in (0, 1]")
    try:
        stored = bentoml.models.get(name)
    except NotFound:
        raise ImportRefused(f"no model {name!r} in the store; import it first") from None
    source = Path(stored.path) / ONNX_FILE
    contract = read_contract(source)
    if contract.extra.get("variant_of"):
        raise ImportRefused(f"{name} is itself a variant of {contract.extra['variant_of']}")
    if contract.task == "text-generation" and contract.extra.get("decoder") == "kv-cache":
        from export.causal_lm import import_text_int8

        return import_text_int8(name, stored, calibration, max_loss, store)
    if contract.task not in IMAGE_TASKS or contract.image is None:
        raise ImportRefused(f"{name} serves {contract.task}: the int8 gate measures agreement on images, so only image "
                            f"models get one")
    feeds = calibration_feeds(contract, calibration)
    variant_name = check_name(f"{name}-int8"[:63])
    variant_contract = dataclasses.replace(contract, name=variant_name,
                                           extra={**contract.extra, "variant": "int8", "variant_of": name})
    value_range = tuple(contract.extra.get("output_range", (0.0, 1.0)))
    done: dict = {}

    def write(tmp: Path) -> None:
        method = quantize_int8(source, tmp, feeds)
        _with_contract(tmp, variant_contract, {"variant": "int8"})
        base, quantized = OnnxSession(source), OnnxSession(tmp)
        output = contract.outputs[0].name
        agreed = [agreement(contract.task, base.run(f)[output], quantized.run(f)[output], value_range) for f in feeds]
        gate = Gate("int8", "agreement with fp32", 1.0, float(np.mean(agreed)), 1 - min_agreement, True,
                    _median_ms(base.run, feeds[:8]), _median_ms(quantized.run, feeds[:8]),
                    f"{method}; calibrated and measured on {len(feeds)} images from {calibration.name}",
                    timed_on=f"{min(8, len(feeds))} of the calibration images")
        settle_int8_gate(gate, f"agrees with fp32 on {gate.value:.4f} of the answers, less than the "
                               f"{min_agreement:g} asked for" if gate.loss > gate.tolerance + 1e-12 else None)
        done["gate"] = gate

    with tempfile.TemporaryDirectory(prefix="suite-import-") as folder:
        path = Path(folder) / ONNX_FILE
        atomic_write(path, write)
        gate = done["gate"]
        tag = store_int8_variant(variant_name, stored, contract, gate, path) if store else None
    log.info("%s: %s; %s", variant_name, gate.reason, gate.summary())
    return gate, tag


# ---- the command line ------------------------------------------------------------------------------

def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m export import",
        description="Store your own model as a served model (a new version in the model store), with its contract, "
                    "a parity check and its measured memory. A model that does not fit its spec is refused with "
                    "the reason, and nothing is written.")
    sources = parser.add_subparsers(dest="source", required=True)
    onnx_cmd = sources.add_parser("onnx", help="an ONNX image model plus a task spec (TOML)")
    onnx_cmd.add_argument("model", type=Path)
    onnx_cmd.add_argument("--spec", type=Path, required=True, help="the task spec (docs/serve-your-own-model.md)")
    hf_cmd = sources.add_parser("huggingface", help="a transformers folder (save_pretrained) of an image classifier, "
                                                     "segmenter or image-to-image model, or of a causal LM (GPT-2, "
                                                     "Llama, Qwen2, Mistral)")
    hf_cmd.add_argument("folder", type=Path)
    hf_cmd.add_argument("--max-batch", type=int, default=32,
                        help="rows a session run may batch (a text model: sequences decoded together)")
    hf_cmd.add_argument("--context-window", type=int, default=2048,
                        help="a text model's most tokens per sequence (prompt + output), at most its own")
    hf_cmd.add_argument("--max-new-tokens", type=int, default=None,
                        help="a text model's most generated tokens per request (default: half the window)")
    int8_cmd = sources.add_parser("int8", help="an int8 variant of a stored model (<name>-int8), kept when it agrees "
                                               "with fp32 on your images (a text model: on your text) and runs faster")
    int8_cmd.add_argument("model", help="the stored model's name")
    int8_cmd.add_argument("--calibration", type=Path, required=True,
                          help="a folder of images like the ones it will serve (at least 4; up to 64 are used); for a "
                               "text model, a UTF-8 text file like what it will read (at least 256 tokens)")
    int8_cmd.add_argument("--max-loss", type=float, default=0.02,
                          help="a text model's most next-token loss over fp32's, nats/token")
    int8_cmd.add_argument("--min-agreement", type=float, default=0.99,
                          help="the share of answers that must agree with fp32's (class, pixel class, 8-bit pixel)")
    int8_cmd.add_argument("--no-store", action="store_true", help="gate only; store nothing")
    tensor_cmd = sources.add_parser("tensor", help="any ONNX graph, served as it is over the Open Inference Protocol")
    tensor_cmd.add_argument("model", type=Path)
    tensor_cmd.add_argument("--max-batch", type=int, default=32,
                            help="rows a session run may batch (when the graph's first axis is dynamic)")
    for cmd in (onnx_cmd, hf_cmd, tensor_cmd):
        cmd.add_argument("--name", default=None, help="the model's name in the store (default: from the file name)")
        cmd.add_argument("--no-store", action="store_true", help="check and convert only; store nothing")
    args = parser.parse_args(argv)
    from export.causal_lm import is_causal_lm

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.source == "int8":
        from export.variants import VariantRefused

        try:
            gate, tag = import_int8(args.model, args.calibration, args.min_agreement, not args.no_store, args.max_loss)
        except (ImportRefused, VariantRefused) as refused:
            print(f"[{args.model}-int8] {refused}" if isinstance(refused, VariantRefused) else f"refused: {refused}")
            return 2
        print(f"[{args.model}-int8] {gate.method}; passed: {gate.summary()}"
              + (f"; stored as {tag}" if tag else "; not stored (--no-store)"))
        return 0
    try:
        if args.source == "onnx":
            contract, tag = import_onnx(args.model, read_spec(args.spec), args.name, not args.no_store)
        elif args.source == "huggingface":
            text = {"context_window": args.context_window, "max_new_tokens": args.max_new_tokens} \
                if is_causal_lm(args.folder) else {}
            contract, tag = import_huggingface(args.folder, args.name, not args.no_store, args.max_batch, **text)
        else:
            contract, tag = import_tensor_model(args.model, args.name, args.max_batch, not args.no_store)
    except ImportRefused as refused:
        print(f"refused: {refused}")
        return 2
    if contract.task == "text-generation":
        extra, limits = contract.extra, contract.limits
        print(f"[{contract.name}] text-generation: {contract.architecture}, {extra['n_head']} heads "
              f"({extra['n_kv_head']} key/value), context window {limits['context_window']}, up to "
              f"{limits['max_new_tokens']} new tokens, {contract.max_batch} sequences decoded together, chat template: "
              f"{'yes' if extra.get('chat_template') else 'no'}" + (f"; stored as {tag}" if tag else "; not stored (--no-store)"))
        return 0
    batch = f"batches of up to {contract.max_batch}" if (contract.max_batch or 1) > 1 else "one request per run"
    print(f"[{contract.name}] {contract.task}: inputs {[(t.name, t.dtype, t.shape) for t in contract.inputs]}, "
          f"outputs {[(t.name, t.dtype, t.shape) for t in contract.outputs]}, {batch}"
          + (f"; stored as {tag}" if tag else "; not stored (--no-store)"))
    return 0
