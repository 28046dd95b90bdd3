"""The model repository: the one place that knows which versions exist in the store, which are
loaded and ready, and that hands out a handle for (name, version).

A handle is one loaded version: its contract (read from the artifact), its ONNX Runtime session and
the runner its requests go through (a dynamic batcher, or one run per request). Every response names
the handle that ran it. ``refresh`` re-reads the store; ``load`` / ``unload`` change what is
loaded, so model control (hot reload) needs no change to the front-ends."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from contract import ONNX_FILE, ModelContract
from services.batching import DynamicBatcher
from services.config import ServingConfig, available_cores
from services.errors import not_found, unavailable
from services.runtime import OnnxSession, read_contract
from services.textengine import EngineLimits, TextEngine

log = logging.getLogger("services.repository")


@dataclass(frozen=True)
class StoredVersion:
    """A version in the store, as the store lists it."""

    name: str
    version: str
    folder: Path
    metadata: dict = field(hash=False, compare=False)
    created_at: float = 0.0  # seconds since the epoch; orders versions, newest first

    @property
    def tag(self) -> str:
        return f"{self.name}:{self.version}"


class ModelStore(Protocol):
    def list_versions(self, name: str) -> list[StoredVersion]:
        """Every version of ``name``, newest first."""


class BentoModelStore:
    """The BentoML model store (``BENTOML_HOME``)."""

    def list_versions(self, name: str) -> list[StoredVersion]:
        import bentoml

        found = [StoredVersion(m.tag.name, m.tag.version, Path(m.path), dict(m.info.metadata),
                               m.info.creation_time.timestamp())
                 for m in bentoml.models.list(name)]
        return sorted(found, key=lambda v: v.created_at, reverse=True)


def batch_major(contract: ModelContract) -> bool:
    """Requests of a model stack when every input and output has the batch on axis 0."""
    return all(t.axis_names[:1] == ["batch"] for t in (*contract.inputs, *contract.outputs))


class ModelHandle:
    """One loaded, warmed-up version. ``infer`` takes validated, batch-major tensors."""

    def __init__(self, stored: StoredVersion, contract: ModelContract, session: OnnxSession, runner: Any,
                 engine: TextEngine | None = None):
        self.stored = stored
        self.name, self.version = stored.name, stored.version
        self.metadata = stored.metadata
        self.contract = contract
        self.session = session
        self.runner = runner  # tensors in, tensors out: the dynamic batcher
        self.engine = engine  # text models: continuous batching of whole generations

    @property
    def tag(self) -> str:
        return self.stored.tag

    @property
    def folder(self) -> Path:
        return self.stored.folder

    async def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return await self.runner.submit(feeds)

    async def close(self) -> None:
        await self.runner.close()
        if self.engine is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.engine.close)


class ModelRepository:
    def __init__(self, config: ServingConfig, store: ModelStore | None = None,
                 observer_for: Callable[[str], Any] | None = None):
        self.config = config
        self.names = config.models
        self.store = store or BentoModelStore()
        self._observer_for = observer_for or (lambda name: None)
        self._versions: dict[str, list[StoredVersion]] = {name: [] for name in self.names}
        self._contracts: dict[tuple[str, str], ModelContract] = {}
        self._loaded: dict[tuple[str, str], ModelHandle] = {}
        self._loading: dict[tuple[str, str], asyncio.Lock] = {}

    # ---- what the store holds ------------------------------------------------------------------

    def refresh(self) -> None:
        """Re-reads the store's version lists (new exports become known; nothing is loaded)."""
        for name in self.names:
            self._versions[name] = self.store.list_versions(name)

    def _check_name(self, name: str) -> None:
        if name not in self._versions:
            raise not_found("model", f"unknown model {name!r}; served: {list(self.names)}")

    def versions(self, name: str) -> list[str]:
        """Versions in the store, newest first (as of the last refresh)."""
        self._check_name(name)
        return [v.version for v in self._versions[name]]

    def stored(self, name: str, version: str | None = None) -> StoredVersion:
        self._check_name(name)
        versions = self._versions[name]
        if not versions:
            raise not_found("model", f"model {name!r} has no version in the store; export one with "
                                     f"`python -m export {name}`")
        if not version:
            return versions[0]
        for stored in versions:
            if stored.version == version:
                return stored
        raise not_found("version", f"model {name!r} has no version {version!r}; have {[v.version for v in versions]}")

    def contract(self, name: str, version: str | None = None) -> ModelContract:
        """The contract of a version (newest by default), read from its artifact without a session."""
        stored = self.stored(name, version)
        key = (stored.name, stored.version)
        loaded = self._loaded.get(key)
        if loaded is not None:
            return loaded.contract
        if key not in self._contracts:
            self._contracts[key] = read_contract(stored.folder / ONNX_FILE)
        return self._contracts[key]

    # ---- what is loaded ------------------------------------------------------------------------

    def loaded(self) -> list[ModelHandle]:
        return list(self._loaded.values())

    def is_ready(self, name: str, version: str | None = None) -> bool:
        stored = self.stored(name, version)
        return (stored.name, stored.version) in self._loaded

    def all_ready(self) -> bool:
        """Every served model has its newest version loaded."""
        return all(self._versions[n] and (n, self._versions[n][0].version) in self._loaded for n in self.names)

    def load(self, name: str, version: str | None = None) -> ModelHandle:
        """Opens, warms up and registers a version (newest by default); blocking."""
        stored = self.stored(name, version)
        key = (stored.name, stored.version)
        if key in self._loaded:
            return self._loaded[key]
        session = OnnxSession(stored.folder / ONNX_FILE, intra_op_threads=self.config.session_threads,
                              inter_op_threads=self.config.inter_op_threads, providers=self.config.providers)
        session.warm_up()
        handle = ModelHandle(stored, session.contract, session, self._runner(stored, session),
                             self._engine(stored, session))
        self._contracts.pop(key, None)  # the handle holds it now
        self._loaded[key] = handle
        log.info("loaded %s (batches of up to %d rows)", stored.tag, handle.runner.max_batch_size)
        return handle

    def load_newest(self) -> list[ModelHandle]:
        """Startup: the newest version of every served model. A model missing from the store is an
        error naming it."""
        self.refresh()
        missing = [n for n in self.names if not self._versions[n]]
        if missing:
            raise RuntimeError(f"models not in the store ({self.store.__class__.__name__}): {missing}; "
                               f"build them with `make models` or `python -m export {missing[0]}`")
        return [self.load(name) for name in self.names]

    async def handle(self, name: str, version: str | None = None) -> ModelHandle:
        """A ready handle; a version not loaded yet (an older one) is loaded off the event loop."""
        stored = self.stored(name, version)
        key = (stored.name, stored.version)
        handle = self._loaded.get(key)
        if handle is not None:
            return handle
        lock = self._loading.setdefault(key, asyncio.Lock())
        async with lock:
            if key not in self._loaded:
                try:
                    await asyncio.get_running_loop().run_in_executor(None, self.load, name, stored.version)
                except Exception as exc:
                    log.exception("loading %s failed", stored.tag)
                    raise unavailable("version", f"{stored.tag} could not be loaded: {type(exc).__name__}") from exc
        return self._loaded[key]

    async def unload(self, name: str, version: str) -> None:
        handle = self._loaded.pop((name, version), None)
        if handle is not None:
            await handle.close()

    async def close(self) -> None:
        for key in list(self._loaded):
            await self.unload(*key)

    def _engine(self, stored: StoredVersion, session: OnnxSession) -> TextEngine | None:
        if session.contract.task != "text-generation":
            return None
        config = self.config
        limits = EngineLimits(config.text_max_live, config.text_max_waiting, config.text_prefill_tokens,
                              config.text_stream_interval_ms / 1000)
        return TextEngine(stored.tag, session.run, session.contract, stored.folder, limits,
                          self._observer_for(stored.name))

    def _runner(self, stored: StoredVersion, session: OnnxSession) -> DynamicBatcher:
        config, contract = self.config, session.contract
        if config.batching and batch_major(contract):
            rows, concurrency = min(contract.max_batch or config.max_batch_size, config.max_batch_size), config.batch_concurrency
        else:  # one request per run, several side by side
            rows, concurrency = 1, max(2, available_cores())
        return DynamicBatcher(stored.tag, session.run, max_batch_size=rows,
                              max_queue_delay_s=config.max_queue_delay_ms / 1000, max_queue=config.max_queue,
                              concurrency=concurrency, observer=self._observer_for(stored.name))
