"""Payload logging and drift metrics.

Requests are sampled (``payload_log_sample``) into JSON-lines records: time, model, version,
variant, route, latency, a summary of the input and of the output (the raw input only with
``payload_log_raw``), and the OOD score where the model gives one. The request path only builds
the record, encodes it and appends the line to a bounded queue (a deque: no lock, no wake-up); a
thread of the worker drains it every ``FLUSH_S`` and writes the batch (to stdout, or to a file rotated by size). When
the writer falls behind, records are dropped and counted (``suite_payload_log_dropped``), never
waited for.

Drift, from every answer (not only the sampled ones): a histogram of OOD scores per model, and the
population stability index of the predicted classes over the worker's last ``DRIFT_WINDOW``
answers against the training distribution the contract stores (``extra["label_distribution"]``,
written by the classify family; an imported model without one has no PSI)."""

from __future__ import annotations

import base64
import collections
import fcntl
import hashlib
import json
import logging
import math
import os
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("services.payload_log")

QUEUE_RECORDS = 10_000  # records waiting for the writer per worker; more are dropped (counted)
FLUSH_S = 0.2  # the writer's period. Measured on /classify at 32 connections: a queue.Queue waking the
#   writer per record cost 13.5 % of the throughput
RAW_BYTES_CAP = 1 << 20  # a raw payload larger than this is summarised only, even with payload_log_raw
DRIFT_WINDOW = 2_000  # predictions per model the PSI is computed over (per worker)
DRIFT_MIN = 200  # predictions before a PSI is reported
PSI_FLOOR = 1e-4  # a class never seen on one side counts as this share (PSI is infinite at 0)


class PayloadLog:
    """One worker's payload log: ``sink`` is "stdout" or a file path; ``None`` sink: off."""

    def __init__(self, sink: str | None, sample: float = 1.0, raw: bool = False, max_bytes: int = 64 << 20,
                 backups: int = 5, metrics: Any = None, rng: random.Random | None = None):
        self.sink = sink or None
        self.sample = sample
        self.raw = raw
        self.max_bytes = max_bytes
        self.backups = backups
        self.metrics = metrics
        self.rng = rng or random.Random()
        self.written = 0
        self.dropped = 0
        self._queue: collections.deque = collections.deque()
        self._limit = QUEUE_RECORDS
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def enabled(self) -> bool:
        return self.sink is not None and self.sample > 0

    def sampled(self) -> bool:
        """Whether this request is recorded (asked before its record is built)."""
        return self.enabled and (self.sample >= 1 or self.rng.random() < self.sample)

    def write(self, record: dict) -> None:
        """Queues ``record``; drops it (counted) when the writer is behind. Never blocks."""
        if self._thread is None:
            self._start()
        if len(self._queue) >= self._limit:
            self.dropped += 1
            if self.metrics is not None:
                self.metrics.payload_dropped()
            return
        # Encoded here, on the event loop, a few microseconds at a time: a writer thread encoding a
        # whole batch held the GIL for milliseconds at once and stalled the loop behind it.
        self._queue.append(_ENCODER.encode(record))  # deque: atomic

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="payload-log", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Writes what is queued, then stops the writer."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        writer = StdoutLines() if self.sink == "stdout" else RotatingLines(Path(self.sink), self.max_bytes,
                                                                           self.backups)
        while True:
            stopping = self._stop.wait(FLUSH_S)
            while self._queue:
                batch = []
                while self._queue and len(batch) < 1024:
                    batch.append(self._queue.popleft())
                data = "\n".join(batch) + "\n"
                try:
                    writer.write(data.encode())
                    self.written += len(batch)
                except OSError as exc:  # a full disk loses records, never the server
                    self.dropped += len(batch)
                    log.error("payload log: %s", exc)
            if stopping:
                writer.close()
                return


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return str(value)


_ENCODER = json.JSONEncoder(separators=(",", ":"), default=_jsonable)  # built once (json.dumps builds one a call)


class StdoutLines:
    def write(self, data: bytes) -> None:
        if data:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()

    def close(self) -> None:
        pass


class RotatingLines:
    """Appends whole lines to ``path``; past ``max_bytes`` the file becomes ``path.1`` (``.1`` ->
    ``.2`` ...; ``backups`` kept). Every worker of a server may append to the same file: writes
    are O_APPEND (one write per batch of whole lines) and the rotation is done under a lock by the
    first worker to see the file full; the others reopen the new file."""

    def __init__(self, path: Path, max_bytes: int, backups: int):
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = -1
        self._inode = None
        self._open()

    def _open(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._inode = os.fstat(self._fd).st_ino

    def write(self, data: bytes) -> None:
        try:
            if os.stat(self.path).st_ino != self._inode:  # another worker rotated it
                self._open()
        except FileNotFoundError:
            self._open()
        if data:
            os.write(self._fd, data)
        if os.fstat(self._fd).st_size >= self.max_bytes:
            self._rotate()

    def _rotate(self) -> None:
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if os.stat(self.path).st_size < self.max_bytes:
                    return  # another worker has just rotated it
            except FileNotFoundError:
                return
            for index in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{index}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{index + 1}"))
            if self.backups:
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            else:
                os.truncate(self.path, 0)
        self._open()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# ---- what a record holds ----------------------------------------------------------------------------

def summarize_value(value: Any, raw: bool) -> Any:
    """A request field as the record keeps it: numbers and short strings as they are; long text as
    its length and hash unless raw payloads are on."""
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    if isinstance(value, str):
        return value if raw or len(value) <= 64 else {"chars": len(value), "sha256": _digest(value.encode())}
    if isinstance(value, (list, tuple)):
        return {"items": len(value)} if not raw else value
    if isinstance(value, dict):
        return {"keys": sorted(value)[:16]} if not raw else value
    return type(value).__name__


def summarize_image(data: bytes | None, raw: bool) -> dict | None:
    if data is None:
        return None
    summary = {"bytes": len(data), "format": _image_format(data), "sha256": _digest(data)}
    if raw and len(data) <= RAW_BYTES_CAP:
        summary["raw"] = data
    return summary


def summarize_tensors(tensors: dict[str, np.ndarray], raw: bool) -> dict:
    """Shape and datatype per tensor; numeric ones with their mean and standard deviation too."""
    out = {}
    for name, array in tensors.items():
        entry: dict[str, Any] = {"shape": list(array.shape), "dtype": str(array.dtype)}
        if array.dtype != object and array.size and array.dtype.kind in "fiub":
            entry["mean"] = round(float(array.mean()), 6)
            entry["std"] = round(float(array.std()), 6)
        if raw and array.nbytes <= RAW_BYTES_CAP:
            entry["raw"] = array.tolist() if array.dtype == object else base64.b64encode(array.tobytes()).decode()
        out[name] = entry
    return out


def summarize_answer(answer: Any) -> dict:
    """A native answer: a JSON answer's small fields (a classifier's top prediction, a generation's
    usage), an image's size, a stream's events."""
    if isinstance(answer, dict):
        out = {}
        for key, value in answer.items():
            if key == "predictions" and isinstance(value, list):
                out["top"] = value[0] if value else None
                out["predictions"] = len(value)
            elif key in ("text", "completion"):
                out["chars"] = len(value) if isinstance(value, str) else None
            elif isinstance(value, (bool, int, float, str)) or value is None:
                out[key] = value if not isinstance(value, str) or len(value) <= 64 else {"chars": len(value)}
            elif isinstance(value, dict) and len(value) <= 8:
                out[key] = value
        return out
    png = getattr(answer, "png", None)
    if isinstance(png, (bytes, bytearray)):
        return {"png_bytes": len(png), "seed": getattr(answer, "seed", None)}
    return {"type": type(answer).__name__}


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _image_format(data: bytes) -> str:
    for magic, name in ((b"\x89PNG", "png"), (b"\xff\xd8", "jpeg"), (b"RIFF", "webp"), (b"BM", "bmp")):
        if data.startswith(magic):
            return name
    return "unknown"


# ---- drift ---------------------------------------------------------------------------------------------

def population_stability_index(expected: np.ndarray, observed: np.ndarray) -> float:
    """PSI = sum((o - e) * ln(o / e)) over the classes' shares; under 0.1 is read as no shift,
    0.1-0.25 as moderate, above 0.25 as a significant one."""
    e = np.maximum(np.asarray(expected, np.float64), PSI_FLOOR)
    o = np.maximum(np.asarray(observed, np.float64), PSI_FLOOR)
    e, o = e / e.sum(), o / o.sum()
    return float(np.sum((o - e) * np.log(o / e)))


class DriftMonitor:
    """Per model: the OOD score histogram (metrics) and the PSI of predicted classes over a window."""

    def __init__(self, metrics: Any = None, window: int = DRIFT_WINDOW, minimum: int = DRIFT_MIN):
        self.metrics = metrics
        self.window, self.minimum = window, minimum
        self._predictions: dict[str, collections.deque] = {}
        self._expected: dict[str, np.ndarray | None] = {}
        self._counts: dict[str, np.ndarray] = {}
        self._since_report: dict[str, int] = {}

    def observe(self, model: str, contract: Any, classes: Any = None, ood_scores: Any = None) -> None:
        """Predicted class ids and OOD scores of one answer (any of them may be None)."""
        # A native answer gives one class and one score (plain numbers): no numpy on that path.
        if ood_scores is not None and self.metrics is not None:
            for score in (ood_scores,) if isinstance(ood_scores, float) else np.atleast_1d(ood_scores):
                if math.isfinite(float(score)):
                    self.metrics.ood_score(model, float(score))
        if classes is None:
            return
        expected = self._reference(model, contract)
        if expected is None:
            return
        window = self._predictions.setdefault(model, collections.deque())
        counts = self._counts.setdefault(model, np.zeros(len(expected), np.int64))
        for class_id in (classes,) if isinstance(classes, int) else np.atleast_1d(classes):
            class_id = int(class_id)
            if not 0 <= class_id < len(expected):
                continue
            window.append(class_id)
            counts[class_id] += 1
            if len(window) > self.window:
                counts[window.popleft()] -= 1
        # The PSI is recomputed every 50 predictions, not per request (numpy calls cost more than a request's share).
        self._since_report[model] = self._since_report.get(model, 0) + 1
        if len(window) >= self.minimum and self._since_report[model] >= 50:
            self._since_report[model] = 0
            psi = population_stability_index(expected, counts / counts.sum())
            if self.metrics is not None:
                self.metrics.class_psi(model, psi)

    def psi(self, model: str) -> float | None:
        expected, counts = self._expected.get(model), self._counts.get(model)
        if expected is None or counts is None or counts.sum() < self.minimum:
            return None
        return population_stability_index(expected, counts / counts.sum())

    def _reference(self, model: str, contract: Any) -> np.ndarray | None:
        if model not in self._expected:
            reference = (contract.extra or {}).get("label_distribution")
            self._expected[model] = np.asarray(reference, np.float64) if reference else None
        return self._expected[model]


def record(handle: Any, route: str, seconds: float, request: dict, answer: dict, ood: Any = None) -> dict:
    """One record (model, version, variant, route, latency, input and output summaries)."""
    body = {"time": round(time.time(), 3), "model": handle.name, "version": handle.version,
            "variant": handle.contract.extra.get("variant", "fp32"), "route": route,
            "latency_ms": round(seconds * 1000, 3), "input": request, "output": answer}
    if ood is not None:
        body["ood_score"] = round(float(ood), 6)
    return body
