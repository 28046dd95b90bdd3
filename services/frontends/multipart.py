"""``multipart/form-data`` bodies (RFC 7578) parsed from memory.

The body is already read and bounded (``Request.body``), so the parts are found with ``bytes.find``
rather than a streaming state machine, and nothing goes to a temporary file. Every malformation is
a 400 that says what is wrong: no boundary, a boundary the body does not contain, a part without
headers or a name, a field given twice, a body cut short before the closing boundary."""

from __future__ import annotations

import re
from dataclasses import dataclass

from services.errors import bad_request

_PARAM = re.compile(r';\s*([A-Za-z0-9_*-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)')
MAX_PARTS = 64


@dataclass(frozen=True)
class Part:
    name: str
    data: bytes
    filename: str | None = None
    content_type: str | None = None

    def text(self) -> str:
        try:
            return self.data.decode("utf-8")
        except UnicodeDecodeError:
            raise bad_request(self.name, "form field is not valid UTF-8") from None


def header_params(value: str) -> dict[str, str]:
    """``form-data; name="image"; filename="a.png"`` -> {"name": "image", "filename": "a.png"}."""
    params = {}
    for key, raw in _PARAM.findall(value):
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        params[key.lower()] = raw
    return params


def boundary_of(content_type: str) -> bytes:
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "multipart/form-data":
        raise bad_request("content-type", f"expected multipart/form-data, got {media or 'nothing'}")
    boundary = header_params(content_type).get("boundary", "")
    if not boundary:
        raise bad_request("content-type", "multipart/form-data without a boundary parameter")
    if len(boundary) > 200:
        raise bad_request("content-type", "multipart boundary longer than 200 characters")
    return boundary.encode("latin-1")


def parse_multipart(body: bytes, content_type: str) -> dict[str, Part]:
    delimiter = b"--" + boundary_of(content_type)
    start = body.find(delimiter)
    if start < 0 or (start > 0 and body[start - 2:start] != b"\r\n"):
        raise bad_request("body", "the multipart boundary from the content-type header is not in the body")
    parts: dict[str, Part] = {}
    position = start + len(delimiter)
    while True:
        if body.startswith(b"--", position):
            return parts  # closing delimiter; anything after it is an epilogue
        if not body.startswith(b"\r\n", position):
            raise bad_request("body", "malformed multipart body: no line break after a boundary")
        position += 2
        headers_end = body.find(b"\r\n\r\n", position)
        if headers_end < 0:
            raise bad_request("body", "malformed multipart body: a part has no blank line after its headers")
        headers = {}
        for line in body[position:headers_end].split(b"\r\n"):
            key, sep, value = line.partition(b":")
            if not sep:
                raise bad_request("body", f"malformed multipart part header {line[:80]!r}")
            headers[key.strip().lower().decode("latin-1")] = value.strip().decode("utf-8", "replace")
        data_start = headers_end + 4
        data_end = body.find(b"\r\n" + delimiter, data_start)
        if data_end < 0:
            raise bad_request("body", "multipart body ends before its closing boundary (truncated upload?)")
        disposition = headers.get("content-disposition", "")
        params = header_params(disposition)
        if not disposition.lower().startswith("form-data") or not params.get("name"):
            raise bad_request("body", "a multipart part has no Content-Disposition: form-data with a name")
        name = params["name"]
        if name in parts:
            raise bad_request(name, "form field given twice")
        if len(parts) >= MAX_PARTS:
            raise bad_request("body", f"more than {MAX_PARTS} multipart parts")
        parts[name] = Part(name, body[data_start:data_end], params.get("filename"), headers.get("content-type"))
        position = data_end + 2 + len(delimiter)
