"""Model control across the worker processes of one server.

Each worker has its own repository (sessions, batchers, engines), so a load or unload asked of one
worker must reach the others. The wanted state (per model: loaded at the newest or a pinned
version, or unloaded) lives in a small JSON file that every worker of the server watches; the
worker that took the request writes it (under a lock, to a temporary file, then a rename), applies
it at once and waits until every worker has acknowledged it. A worker that starts later (one
replacing a killed worker) reads the file first, so it starts in the state the others are in.

The folder is per server, under the ``control_dir`` setting (default ``<BENTOML_HOME>/control``):
named after the process that started the workers (BentoML's arbiter, the parent of every worker)
and the HTTP port."""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

from common.files import atomic_write
from common.resources import process_alive
from services.repository import ModelRepository, WantedState

log = logging.getLogger("services.control")


class ControlFile:
    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.folder = folder
        self.path = folder / "wanted.json"
        self._lock_path = folder / "lock"

    @classmethod
    def for_server(cls, root: Path, http_port: int) -> ControlFile:
        """The folder of this server (``control_dir`` setting) under ``root``: not /tmp, where any
        local user could plant or read another server's wanted state."""
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        for stale in root.glob("server-*-*"):  # left by servers that have stopped
            pid = stale.name.split("-")[1]
            if pid.isdigit() and not process_alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        return cls(root / f"server-{os.getppid()}-{http_port}")

    def stamp(self) -> int:
        """Changes whenever the file is replaced (cheap enough to ask twice a second)."""
        try:
            return self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    def read(self) -> tuple[int, dict[str, WantedState]]:
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return 0, {}
        return data["generation"], {name: WantedState.from_json(s) for name, s in data["models"].items()}

    def change(self, changes: Mapping[str, WantedState]) -> tuple[int, dict[str, WantedState]]:
        """Merges ``changes`` into the wanted state; -> (the new generation, what the changed models
        wanted before: the default state for a model not named yet)."""
        with open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            generation, wanted = self.read()
            previous = {name: wanted.get(name, WantedState()) for name in changes}
            wanted.update(changes)
            generation += 1
            document = {"generation": generation, "models": {n: s.to_json() for n, s in wanted.items()}}
            atomic_write(self.path, json.dumps(document).encode())
            return generation, previous

    def acknowledge(self, generation: int, errors: Mapping[str, str]) -> None:
        document = {"pid": os.getpid(), "generation": generation, "errors": dict(errors)}
        atomic_write(self.folder / f"ack-{os.getpid()}.json", json.dumps(document).encode())

    def acknowledgements(self, generation: int) -> dict[int, dict[str, str]]:
        """Live workers that have applied ``generation`` or later -> their errors."""
        found = {}
        for path in self.folder.glob("ack-*.json"):
            try:
                ack = json.loads(path.read_bytes())
            except (OSError, ValueError):
                continue
            if not process_alive(ack["pid"]):
                path.unlink(missing_ok=True)
            elif ack["generation"] >= generation:
                found[ack["pid"]] = ack["errors"]
        return found


class ModelControl:
    """One worker's side: applies the wanted state when it changes, asks for changes, and (when
    ``refresh_s`` > 0) switches models that follow the newest stored version to a newer export."""

    def __init__(self, repository: ModelRepository, control_file: ControlFile, workers: int,
                 refresh_s: float = 0.0, watch_s: float = 0.5):
        self.repository = repository
        self.file = control_file
        self.workers = workers
        self.refresh_s = refresh_s
        self.watch_s = watch_s
        self._applied = 0
        self._stamp = 0

    def start(self) -> None:
        """Start-up (blocking): the repository loads what the server's wanted state says."""
        self._stamp = self.file.stamp()
        self._applied, wanted = self.file.read()
        self.repository.start(wanted)
        self.file.acknowledge(self._applied, self.repository.not_ready())

    async def change(self, changes: Mapping[str, WantedState], timeout: float = 180.0) -> tuple[dict[str, str], int]:
        """Applies ``changes`` in every worker; -> (errors by model from any worker, workers that
        have applied it). Returns when all have, or after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        generation, previous = await loop.run_in_executor(None, self.file.change, changes)
        errors = await self._apply(generation, changes)
        deadline = time.monotonic() + timeout
        while True:
            acks = await loop.run_in_executor(None, self.file.acknowledgements, generation)
            if len(acks) >= self.workers or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        for worker_errors in acks.values():
            for name, error in worker_errors.items():
                if name in changes:
                    errors.setdefault(name, error)
        if errors:  # a load that failed is not left wanted: workers starting later would fail it again
            await loop.run_in_executor(None, self.file.change, {name: previous[name] for name in errors})
        return errors, len(acks)

    async def run(self) -> None:
        """The watch loop (a task for the worker's lifetime)."""
        next_refresh = time.monotonic() + self.refresh_s
        while True:
            await asyncio.sleep(self.watch_s)
            try:
                stamp = self.file.stamp()
                if stamp != self._stamp:
                    self._stamp = stamp
                    generation, wanted = self.file.read()
                    if generation > self._applied:
                        await self._apply(generation, wanted)
                if self.refresh_s and time.monotonic() >= next_refresh:
                    next_refresh = time.monotonic() + self.refresh_s
                    errors = await self.repository.refresh_newest()
                    for name, error in errors.items():
                        log.error("periodic refresh: %s", error)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the watch must outlive one bad read
                log.exception("model control: applying the wanted state failed")

    async def _apply(self, generation: int, wanted: Mapping[str, WantedState]) -> dict[str, str]:
        self._applied = max(self._applied, generation)
        errors = await self.repository.apply(wanted)
        self.file.acknowledge(self._applied, errors)
        return errors
