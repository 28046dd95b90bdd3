"""Transport-neutral Open Inference Protocol logic shared by the REST and gRPC front-ends: datatype
tables, tensor decoding/encoding (JSON lists, raw bytes, Triton's length-prefixed BYTES), metadata
read from the hub's contracts, and inference through ``Suite``."""

from __future__ import annotations

import json
import secrets
import struct
from typing import Any, Iterable

import anyio
import bentoml
import numpy as np

from services.errors import NotReadyError, RequestError
from services.textgen import SamplingParams, TextGenerator

SERVER_NAME = "model-suite"
PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ["binary_tensor_data", "parameters"]

# OIP datatype -> numpy dtype (BYTES tensors are object arrays of ``bytes``).
NUMPY = {
    "BOOL": np.dtype(bool), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
OIP = {v: k for k, v in NUMPY.items()}

# The generate model also speaks text: these two tensors exist only on this protocol.
TEXT_MODEL, TEXT_INPUT, TEXT_OUTPUT = "generate", "text_input", "text_output"
TEXT_PARAMETERS = {"max_new_tokens": int, "temperature": float, "top_k": int, "top_p": float, "seed": int}


def oip_datatype(dtype: np.dtype) -> str:
    try:
        return OIP[np.dtype(dtype)]
    except KeyError:
        raise RequestError("datatype", f"numpy dtype {dtype} has no Open Inference Protocol datatype") from None


def numpy_dtype(name: str, datatype: str) -> np.dtype:
    try:
        return NUMPY[datatype]
    except KeyError:
        raise RequestError(name, f"unknown datatype {datatype!r}; known: {sorted(NUMPY)}") from None


def check_shape(name: str, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                       for d in shape):
        raise RequestError(name, f"shape must be a list of non-negative integers, got {shape!r}")
    return tuple(int(d) for d in shape)


def serialize_bytes(array: np.ndarray) -> bytes:
    """Triton's BYTES wire format: each element as 4-byte little-endian length + bytes, row-major."""
    parts = []
    for item in array.ravel(order="C"):
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def deserialize_bytes(name: str, raw: bytes | memoryview, count: int) -> np.ndarray:
    raw = memoryview(raw)
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise RequestError(name, "truncated BYTES element length")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise RequestError(name, "BYTES element runs past the end of the tensor data")
        items.append(bytes(raw[offset: offset + length]))
        offset += length
    if len(items) != count:
        raise RequestError(name, f"{len(items)} BYTES elements given, shape needs {count}")
    out = np.empty(count, dtype=object)
    out[:] = items
    return out


def tensor_from_raw(name: str, datatype: str, shape: Any, raw: bytes | memoryview) -> np.ndarray:
    """Binary tensor data (REST extension or gRPC raw contents) -> array."""
    dtype, shape = numpy_dtype(name, datatype), check_shape(name, shape)
    count = int(np.prod(shape, dtype=np.int64))
    if datatype == "BYTES":
        return deserialize_bytes(name, raw, count).reshape(shape)
    if len(raw) != count * dtype.itemsize:
        raise RequestError(name, f"{len(raw)} bytes of data given, shape {list(shape)} of {datatype} needs "
                                 f"{count * dtype.itemsize}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def tensor_from_list(name: str, datatype: str, shape: Any, data: Any) -> np.ndarray:
    """JSON ``data`` (flat or nested, row-major) -> array."""
    dtype, shape = numpy_dtype(name, datatype), check_shape(name, shape)
    count = int(np.prod(shape, dtype=np.int64))
    if not isinstance(data, list):
        data = [data]
    try:
        if datatype == "BYTES":
            flat = np.asarray(data, dtype=object).ravel()
            items = [x.encode("utf-8") if isinstance(x, str) else x for x in flat]
            if not all(isinstance(x, bytes) for x in items):
                raise ValueError("BYTES elements must be strings")
            array = np.empty(len(items), dtype=object)
            array[:] = items
        else:
            flat = np.asarray(data).ravel()
            if flat.dtype == object or flat.dtype.kind in "USV":
                raise ValueError("elements must be numbers" + (" or booleans" if datatype == "BOOL" else ""))
            if dtype.kind in "iu" and flat.dtype.kind == "f":
                if not np.all(np.isfinite(flat)) or not np.all(flat == np.round(flat)):
                    raise ValueError(f"{datatype} elements must be integers")
            array = flat.astype(dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise RequestError(name, f"data does not fit datatype {datatype}: {exc}") from None
    if array.size != count:
        raise RequestError(name, f"{array.size} data elements given, shape {list(shape)} needs {count}")
    return array.reshape(shape)


def tensor_to_list(array: np.ndarray) -> list:
    flat = array.ravel(order="C")
    if flat.dtype == object:
        return [x.decode("utf-8", errors="replace") if isinstance(x, bytes) else str(x) for x in flat]
    return flat.tolist()


def tensor_to_raw(array: np.ndarray) -> bytes:
    if array.dtype == object:
        return serialize_bytes(array)
    return np.ascontiguousarray(array).tobytes()


class OipCore:
    """What both transports call. Holds the ``Suite`` instance; all inference goes through
    ``Suite.infer`` (tensors) or ``Suite.text`` (text generation)."""

    def __init__(self, suite: Any):
        self.suite = suite
        self.hub = suite.hub
        self.grpc_up = False  # set by the gRPC front-end; readiness on both transports reflects it
        self.grpc_error: str | None = None
        self._text: dict[str, TextGenerator] = {}

    # ---- health and metadata --------------------------------------------------------------------

    def ready(self) -> bool:
        return self.grpc_up

    def require_ready(self) -> None:
        if not self.ready():
            raise NotReadyError("server", f"not ready: gRPC front-end is down ({self.grpc_error or 'not started'})")

    def server_metadata(self) -> dict:
        return {"name": SERVER_NAME, "version": bentoml.__version__, "extensions": EXTENSIONS}

    def model_ready(self, name: str, version: str | None) -> bool:
        self.hub.describe(name, version or None)  # NotFoundError for unknown model/version
        return True  # every stored version is servable (older ones open on first use)

    def model_metadata(self, name: str, version: str | None) -> dict:
        stored = self.hub.describe(name, version or None)
        c = stored.contract
        inputs = [{"name": t.name, "datatype": t.oip_datatype, "shape": list(t.shape)} for t in c.inputs]
        outputs = [{"name": t.name, "datatype": t.oip_datatype, "shape": list(t.shape)} for t in c.outputs]
        if name == TEXT_MODEL:
            inputs.append({"name": TEXT_INPUT, "datatype": "BYTES", "shape": [1]})
            outputs.append({"name": TEXT_OUTPUT, "datatype": "BYTES", "shape": [1]})
        return {"name": name, "versions": list(self.hub.versions(name)), "platform": PLATFORM,
                "inputs": inputs, "outputs": outputs}

    # ---- inference -------------------------------------------------------------------------------

    async def infer(self, name: str, version: str | None, feeds: dict[str, np.ndarray],
                    parameters: dict[str, Any] | None = None,
                    requested: Iterable[str] | None = None) -> tuple[str, dict[str, np.ndarray], dict[str, Any]]:
        """-> (version, outputs in contract order filtered by ``requested``, response parameters)."""
        stored = self.hub.describe(name, version or None)
        out_params: dict[str, Any] = {}
        if name == TEXT_MODEL and TEXT_INPUT in feeds:
            outputs, out_params = await self._generate_text(stored, feeds, parameters or {})
            known = [TEXT_OUTPUT]
        else:
            outputs = await self.suite.infer(name, stored.version, feeds)
            known = [t.name for t in stored.contract.outputs]
        if requested is not None:
            requested = list(requested)
            unknown = [n for n in requested if n not in outputs]
            if unknown:
                raise RequestError(unknown[0], f"unknown output tensor; this request can return {known}")
            outputs = {n: outputs[n] for n in requested}
        return stored.version, outputs, out_params

    def _generator(self, stored) -> TextGenerator:
        if stored.version == self.hub.versions(TEXT_MODEL)[0]:
            return self.suite.text  # the native API's generator: same session, same text
        if stored.version not in self._text:
            self._text[stored.version] = TextGenerator(self.hub.get(TEXT_MODEL, stored.version))
        return self._text[stored.version]

    async def _generate_text(self, stored, feeds, parameters) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        extra = [n for n in feeds if n != TEXT_INPUT]
        if extra:
            raise RequestError(extra[0], f"{TEXT_INPUT} is used alone; do not send model tensors with it")
        tensor = feeds[TEXT_INPUT]
        if tensor.dtype != object:
            raise RequestError(TEXT_INPUT, f"datatype {oip_datatype(tensor.dtype)} given, BYTES expected")
        if tensor.shape not in ((1,), (1, 1)):
            raise RequestError(TEXT_INPUT, f"shape {list(tensor.shape)} given, [1] or [1, 1] expected")
        try:
            prompt = tensor.ravel()[0].decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(TEXT_INPUT, "prompt is not valid UTF-8") from None
        params = self.sampling(parameters)
        generator = self._generator(stored)
        done = await anyio.to_thread.run_sync(generator.complete, prompt, params)
        text = np.empty(tensor.shape, dtype=object)
        text.ravel()[0] = done.text.encode("utf-8")
        return {TEXT_OUTPUT: text}, {"finish_reason": done.finish_reason, "seed": params.seed,
                                     "prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens}

    @staticmethod
    def sampling(parameters: dict[str, Any]) -> SamplingParams:
        """Request parameters -> SamplingParams with the native /generate defaults; a missing seed
        gets a random one (returned in the response parameters)."""
        values: dict[str, Any] = {}
        for key, kind in TEXT_PARAMETERS.items():
            if key not in parameters:
                continue
            value = parameters[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RequestError(key, f"must be a number, got {value!r}")
            if kind is int and (isinstance(value, float) and not value.is_integer()):
                raise RequestError(key, f"must be an integer, got {value!r}")
            values[key] = kind(value)
        stop = parameters.get("stop")
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            if stop.startswith("["):  # a JSON list in a string parameter (gRPC has no list parameters)
                try:
                    stop = json.loads(stop)
                except json.JSONDecodeError:
                    raise RequestError("stop", "not a valid JSON list of strings") from None
            else:
                stop = [stop]
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise RequestError("stop", "must be a string or a list of strings")
        seed = values.pop("seed", None)
        return SamplingParams(**values, seed=seed if seed is not None else secrets.randbits(63), stop=tuple(stop))
