"""Writing a file so that a crash or a concurrent reader never sees half of it."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable


def atomic_write(path: Path, content: bytes | Callable[[Path], object]) -> None:
    """Writes ``path`` so that readers see the old file or the new one, never a half-written one:
    to a temporary file beside it, then a rename. ``content``: the bytes, or a function that
    writes the file at the path it is given (``torch.save``, ``onnx.save``: anything that takes a
    path). The folder is made when missing; the temporary file is gone afterwards, written or not.

    The temporary name is unique per call (writers in other threads or processes never share one)
    and the file is created as ``open`` creates it, so its mode follows the umask."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        if callable(content):
            content(temporary)
        else:
            with open(temporary, "xb") as out:
                out.write(content)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
