"""What every task shares: the tensor path (names, datatypes and shapes against the contract, the
batch limit, the memory budget), the native routes a task declares, and the results the native
front-end turns into HTTP answers.

A task is one module in this package holding a ``TaskHandler`` subclass (``TASK``) and one line in
the registry (``services/tasks/__init__.py``). The handler knows its task only through the
contract of the model it is given: never which training family or import produced it."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Mapping

import numpy as np

from common.runtime import OnnxSession
from contract import DTYPES, ModelContract, TensorSpec
from services.batching import DynamicBatcher
from services.budget import MemoryBudget, model_cost
from services.config import ServingConfig
from services.errors import bad_request, too_large
from services.repository import ModelHandle, StoredVersion, model_batcher
from services.rollout import psnr_db

Tensors = dict[str, np.ndarray]
# Images up to this many pixels are decoded and encoded on the event loop: a thread hop costs more
# than the work. Larger ones go to a thread so the loop keeps serving.
INLINE_PIXELS = 256 * 256
BYTES_DTYPE = np.dtype(object)


async def cpu_work(pixels: int, fn, *args):
    if pixels <= INLINE_PIXELS:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


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


# ---- what a task's native route answers (transport-neutral; the native front-end encodes them) ----

@dataclass
class ImageResult:
    model: str  # name:version of the handle that ran
    png: bytes
    seed: int | None = None


@dataclass
class EventStream:
    """Server-sent events: one JSON object per event as they come, then ``[DONE]``."""

    model: str
    events: AsyncIterator[dict]


@dataclass(frozen=True)
class NativeRoute:
    """One route of a task's native HTTP API. ``run`` names the handler's coroutine, called as
    ``run(handle, image, values)``: the upload's bytes (``body="image"``; None for JSON routes) and
    the request's fields, parsed by their schema's type (form and query values are text). Its
    answer is a JSON-ready dict, an ``ImageResult`` or an ``EventStream``."""

    path: str
    run: str
    body: str  # "image": multipart 'image' part or the image as the body, fields as form or query; "json": an object
    summary: str
    fields: Callable[[ModelContract | None], dict[str, dict]]  # name -> JSON schema (limits from the contract)
    responses: dict = field(default_factory=dict)  # OpenAPI responses on success
    cancel_on_disconnect: bool = False  # the work stops when the client leaves (it may take seconds)


def json_answer(description: str, properties: dict) -> dict:
    return {"200": {"description": description, "content": {"application/json": {"schema": {
        "type": "object", "properties": properties}}}}}


def png_answer(description: str) -> dict:
    return {"200": {"description": description, "headers": {"X-Model": {"schema": {"type": "string"},
                                                                          "description": "name:version that ran"}},
                    "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}}


class TaskHandler:
    """One task. The tensor path (Open Inference Protocol) is shared: names, datatypes and shapes
    against the contract, then the batch limit, then the task's own limits (``check_values``).
    A subclass adds its native routes, their work, and what its models need to run."""

    name = ""  # the contract's task: which models this handler serves
    default_model: str | None = None  # the model a native request naming none gets, when served
    routes: tuple[NativeRoute, ...] = ()
    runs_long = False  # a request may take seconds: cancelled when its client leaves

    def __init__(self, budget: MemoryBudget | None = None, config: ServingConfig | None = None):
        self.budget = budget or MemoryBudget(None)  # the worker's memory for requests in flight
        self.config = config or ServingConfig()
        # contract -> {input name: (its spec or extra tensor, its element limit)}: check_declared
        # runs on every tensor request; the contract is held, so its id() is not reused.
        self._declared: dict[int, tuple[ModelContract, dict[str, tuple[Any, int | None]]]] = {}

    # ---- what a loaded model of this task runs on --------------------------------------------------

    @classmethod
    def runners(cls, stored: StoredVersion, session: OnnxSession, config: ServingConfig,
                observer: Any) -> tuple[DynamicBatcher, Any]:
        """(the dynamic batcher every tensor request goes through, the task's own scheduler or None),
        built when the repository loads a version."""
        return model_batcher(stored, session, config, observer), None

    def upload_limit(self, contract: ModelContract) -> int:
        """The largest body an image route of this task takes for this model: 4 bytes a pixel (RGBA)
        at its pixel limit."""
        return 4 * contract.limits.get("max_pixels", 0)

    def openapi(self, contract: ModelContract | None, served: list[str]) -> dict:
        """This task's native routes in the OpenAPI document (``contract``: the default model's,
        whose limits the schemas state; ``served``: the models a request may name)."""
        paths = {}
        for route in self.routes:
            fields = {**route.fields(contract), "model": {
                "type": "string", "description": f"served model to use, as name or name:version (default: "
                                                 f"{self.default_model or 'the first served ' + self.name + ' model'}); "
                                                 f"served now: {', '.join(served) or 'none'}"}}
            errors = openapi_errors(400, 413, 415, 503)
            if route.body == "image":
                form = {"type": "object", "required": ["image"], "properties": {
                    "image": {"type": "string", "format": "binary", "description": "PNG, JPEG, WebP or BMP"}, **fields}}
                raw = {"schema": {"type": "string", "format": "binary"}}
                paths[route.path] = {"post": {
                    "summary": route.summary,
                    "parameters": [{"name": k, "in": "query", "required": False, "schema": v} for k, v in fields.items()],
                    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form},
                                                                  "image/png": raw, "image/jpeg": raw}},
                    "responses": {**route.responses, **errors}}}
            else:
                schema = {"type": "object", "additionalProperties": False, "properties": fields}
                paths[route.path] = {"post": {
                    "summary": route.summary,
                    "requestBody": {"required": False, "content": {"application/json": {"schema": schema}}},
                    "responses": {**route.responses, **errors}}}
        return paths

    # ---- the tensor path (Open Inference Protocol) ---------------------------------------------------

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

    # ---- shadow rollouts: a candidate's answers against the primary's -----------------------------

    measure = "close_fraction"  # the measure ``compare`` gives (the rollout's metrics and figures name it)
    default_min_agreement = 0.99  # a candidate is promoted at or above this mean, refused below

    def compare(self, contract: ModelContract, primary: Tensors, candidate: Tensors) -> float | None:
        """The candidate's outputs of one session run against the primary's, in this task's measure
        (None: they cannot be compared). Any model: the share of rows whose every output is within
        1e-2 relative (1e-3 absolute) of the primary's."""
        rows = None
        for spec in contract.outputs:
            a, b = primary.get(spec.name), candidate.get(spec.name)
            if a is None or b is None or a.shape != b.shape or a.dtype == object:
                return None
            a, b = a.reshape(len(a), -1) if a.ndim else a.reshape(1, 1), b.reshape(len(b), -1) if b.ndim else \
                b.reshape(1, 1)
            close = np.isclose(b, a, rtol=1e-2, atol=1e-3).all(axis=1)
            rows = close if rows is None else rows & close
        return float(rows.mean()) if rows is not None and rows.size else None




def image_psnr(self: TaskHandler, contract: ModelContract, primary: Tensors, candidate: Tensors) -> float | None:
    """``compare`` of the tasks whose answer is an image: the PSNR of the candidate's against the
    primary's, over the contract's output range (``extra["output_range"]``, default [0, 1])."""
    name = contract.outputs[0].name
    if primary[name].shape != candidate[name].shape:
        return None
    low, high = contract.extra.get("output_range", (0.0, 1.0))
    return psnr_db(primary[name], candidate[name], float(high) - float(low))


ERROR_REASONS = {400: "bad input; `field` names it", 404: "unknown model or version", 405: "method not allowed",
                 413: "body or image over its limit", 415: "unsupported content type",
                 503: "not ready or overloaded; retry after `Retry-After` seconds"}


def openapi_errors(*codes: int) -> dict:
    """OpenAPI responses for error statuses, each the suite's error object."""
    return {str(c): {"description": ERROR_REASONS[c], "content": {"application/json": {"schema": {
        "$ref": "#/components/schemas/Error"}}}} for c in codes}


def shape_matches(spec: TensorSpec, shape: tuple[int, ...]) -> bool:
    return len(shape) == len(spec.shape) and all(d < 0 or d == s for d, s in zip(spec.shape, shape))


def check_image_inputs(contract: ModelContract, feeds: Tensors) -> None:
    """Every 4-dimensional input against the contract's image limits."""
    for spec in contract.inputs:
        if len(spec.shape) == 4:
            check_image_tensor(contract, spec.name, feeds[spec.name])


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
