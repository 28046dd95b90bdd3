"""Open Inference Protocol tensor codecs shared by the REST and gRPC front-ends: JSON lists, raw
little-endian bytes, and Triton's length-prefixed BYTES. Datatypes come from the one table in
``contract``. Declared shapes are checked against the data before anything is allocated."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from contract import DTYPES, NUMPY_DTYPES
from services.errors import bad_request

MAX_ELEMENTS = 1 << 31  # a declared shape above this is refused before any allocation


def oip_datatype(dtype: np.dtype) -> str:
    try:
        return DTYPES[np.dtype(dtype).name]
    except KeyError:
        raise bad_request("datatype", f"numpy dtype {dtype} has no Open Inference Protocol datatype") from None


def numpy_dtype(name: str, datatype: Any) -> np.dtype:
    try:
        return np.dtype(NUMPY_DTYPES[datatype])
    except (KeyError, TypeError):
        raise bad_request(name, f"unknown datatype {datatype!r}; known: {sorted(NUMPY_DTYPES)}") from None


def element_count(name: str, shape: Any) -> tuple[tuple[int, ...], int]:
    if not isinstance(shape, (list, tuple)) or not all(
            isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad_request(name, f"shape must be a list of non-negative integers, got {shape!r}")
    count, nonzero = 1, 1
    for d in shape:
        count *= int(d)
        nonzero *= max(1, int(d))  # (0, 2**62) holds nothing, yet numpy cannot even describe it
        if nonzero > MAX_ELEMENTS:
            raise bad_request(name, f"shape {list(shape)} claims more than {MAX_ELEMENTS} elements")
    return tuple(int(d) for d in shape), count


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
        if len(items) >= count:
            raise bad_request(name, f"more BYTES elements than the {count} the shape declares")
        if offset + 4 > len(raw):
            raise bad_request(name, "truncated BYTES element length")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise bad_request(name, "BYTES element runs past the end of the tensor data")
        items.append(bytes(raw[offset: offset + length]))
        offset += length
    if len(items) != count:
        raise bad_request(name, f"{len(items)} BYTES elements given, shape needs {count}")
    out = np.empty(count, dtype=object)
    out[:] = items
    return out


def tensor_from_raw(name: str, datatype: Any, shape: Any, raw: bytes | memoryview) -> np.ndarray:
    """Binary tensor data (REST extension or gRPC raw contents) -> array (a view when possible)."""
    dtype = numpy_dtype(name, datatype)
    shape, count = element_count(name, shape)
    if dtype == object:
        return deserialize_bytes(name, raw, count).reshape(shape)
    if len(raw) != count * dtype.itemsize:
        raise bad_request(name, f"{len(raw)} bytes of data given, shape {list(shape)} of {datatype} needs "
                                f"{count * dtype.itemsize}")
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(shape)


def tensor_from_list(name: str, datatype: Any, shape: Any, data: Any) -> np.ndarray:
    """JSON ``data`` (flat or nested, row-major) -> array."""
    dtype = numpy_dtype(name, datatype)
    shape, count = element_count(name, shape)
    if not isinstance(data, list):
        data = [data]
    try:
        if dtype == object:
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
        raise bad_request(name, f"data does not fit datatype {datatype}: {exc}") from None
    if array.size != count:
        raise bad_request(name, f"{array.size} data elements given, shape {list(shape)} needs {count}")
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
