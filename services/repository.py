"""The model repository: the one place that knows which versions exist in the store, which are
loaded and ready, and that hands out a handle for (name, version).

A handle is one loaded version: its contract (read from the artifact), its ONNX Runtime session and
the runner its requests go through (a dynamic batcher, or one run per request). Every response names
the handle that ran it. ``refresh`` re-reads the store; ``load`` / ``unload`` change what is
loaded, so model control (hot reload) needs no change to the front-ends."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol

import numpy as np

from common.resources import available_cores
from common.runtime import OnnxSession, read_contract
from contract import ONNX_FILE, ModelContract
from services.batching import DynamicBatcher
from services.config import ServingConfig
from services.errors import ServingError, not_found, unavailable

log = logging.getLogger("services.repository")
# A model folder beside BentoML's own store (``model_dir``) is read with BentoML's private store class,
# ``bentoml._internal.models.model.ModelStore`` (BentoML has no public API for a second root). Checked
# against this BentoML: the sha256 of ``inspect.getsource`` of the classes it runs; an upgrade fails
# tests/test_private_patches.py until re-checked.
BENTOML_STORE_WRITTEN_FOR = "1.4.39"
BENTOML_STORE_SHA256 = {
    "bentoml._internal.models.model.ModelStore": "3316fa757d0a76f31676e3e97b2d1ce8e8ea242cd2600456f2b5891f757ba39a",
    "bentoml._internal.store.Store": "83f35d51766827fe4db8a2576697cc2cbd1e9c1c83925346403c3044a6c9f1fd",
}


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

    def list_names(self, tasks: Iterable[str] | None = None) -> list[str]:
        """Every model name in the store whose metadata names one of ``tasks`` (None: any)."""


class BentoModelStore:
    """A BentoML model store: BentoML's own (``BENTOML_HOME``, or the bento's inside its image), or
    the one in ``folder`` (a ``models`` folder in the store's layout, ``<name>/<version>/``: what
    ``python -m export import`` writes under its ``BENTOML_HOME``, mounted into a pod at run time)."""

    def __init__(self, folder: Path | None = None):
        self.folder = folder

    def _list(self, name: str | None = None) -> list:
        import bentoml
        from bentoml.exceptions import NotFound

        try:
            if self.folder is None:
                return bentoml.models.list(name) if name else bentoml.models.list()
            # private (see BENTOML_STORE_SHA256): the same layout as BentoML's store, another root
            from bentoml._internal.models.model import ModelStore as BentoStore

            return BentoStore(str(self.folder)).list(name)
        except (NotFound, FileNotFoundError):
            return []

    def list_versions(self, name: str) -> list[StoredVersion]:
        found = [StoredVersion(m.tag.name, m.tag.version, Path(m.path), dict(m.info.metadata),
                               m.info.creation_time.timestamp())
                 for m in self._list(name)]
        return sorted(found, key=lambda v: v.created_at, reverse=True)

    def list_names(self, tasks: Iterable[str] | None = None) -> list[str]:
        wanted = None if tasks is None else set(tasks)
        return sorted({m.tag.name for m in self._list() if wanted is None or m.info.metadata.get("task") in wanted})


class CombinedStore:
    """Several stores read as one (the image's own models and a mounted model folder)."""

    def __init__(self, stores: list[ModelStore]):
        self.stores = stores

    def list_versions(self, name: str) -> list[StoredVersion]:
        found = [v for store in self.stores for v in store.list_versions(name)]
        return sorted(found, key=lambda v: v.created_at, reverse=True)

    def list_names(self, tasks: Iterable[str] | None = None) -> list[str]:
        return sorted({n for store in self.stores for n in store.list_names(tasks)})


def model_store(config: ServingConfig) -> ModelStore:
    """What a server reads its models from: BentoML's store, plus ``config.model_dir`` if set."""
    if not config.model_dir:
        return BentoModelStore()
    return CombinedStore([BentoModelStore(), BentoModelStore(Path(config.model_dir))])


def served_names(config: ServingConfig, store: ModelStore, defaults: tuple[str, ...] = (),
                 tasks: Iterable[str] | None = None) -> tuple[str, ...]:
    """What a server serves: ``config.models``, or else ``defaults`` (served whether or not the
    store has them yet, so readiness says what is missing) and every other model in the store whose
    task is one of ``tasks`` (the benchmark models, imported models)."""
    if config.models:
        return config.models
    found = store.list_names(tasks) if hasattr(store, "list_names") else []
    return tuple(defaults) + tuple(n for n in found if n not in defaults)


def batch_major(contract: ModelContract) -> bool:
    """Requests of a model stack when every input and output has the batch on axis 0."""
    return all(t.axis_names[:1] == ["batch"] for t in (*contract.inputs, *contract.outputs))


def model_batcher(stored: "StoredVersion", session: OnnxSession, config: ServingConfig, observer: Any) -> DynamicBatcher:
    """The dynamic batcher a loaded version's requests go through: models whose every tensor is
    batch-major batch (up to their contract's max_batch); others run one request per session run,
    several side by side."""
    contract, own = session.contract, config.limits(stored.name)
    if config.batching and batch_major(contract):
        rows = min(contract.max_batch or own.max_batch_size, own.max_batch_size)
        concurrency = config.batch_concurrency
    else:
        rows, concurrency = 1, max(2, available_cores())
    return DynamicBatcher(stored.tag, session.run, max_batch_size=rows,
                          max_queue_delay_s=config.max_queue_delay_ms / 1000, max_queue=own.max_queue,
                          max_queue_wait_s=own.max_queue_wait_ms / 1000, concurrency=concurrency, observer=observer)


Runners = Callable[["StoredVersion", OnnxSession], tuple[DynamicBatcher, Any]]


class ModelHandle:
    """One loaded, warmed-up version. ``infer`` takes validated, batch-major tensors."""

    def __init__(self, stored: StoredVersion, contract: ModelContract, runner: Any, engine: Any = None):
        self.stored = stored
        self.name, self.version = stored.name, stored.version
        self.contract = contract
        self.runner = runner  # tensors in, tensors out: the dynamic batcher
        self.engine = engine  # the task's own scheduler, if any (text: continuous batching of whole generations):
        #   admission_error(), idle(), close() like the runner

    @property
    def tag(self) -> str:
        return self.stored.tag

    async def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return await self.runner.submit(feeds)

    def admission_error(self) -> ServingError | None:
        """Why a request for this version arriving now would be refused (503), or None."""
        if self.engine is not None:
            return self.engine.admission_error() or self.runner.admission_error()
        return self.runner.admission_error()

    def idle(self) -> bool:
        return self.runner.idle() and (self.engine is None or self.engine.idle())

    async def drain(self, timeout: float) -> None:
        """Lets the requests already queued or running finish (up to ``timeout`` s), then closes."""
        deadline = time.monotonic() + timeout
        quiet = 0
        while quiet < 2 and time.monotonic() < deadline:  # idle twice in a row: no request was just handed out
            quiet = quiet + 1 if self.idle() else 0
            await asyncio.sleep(0.05)
        await self.close()

    async def close(self) -> None:
        await self.runner.close()
        if self.engine is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.engine.close)


@dataclass(frozen=True)
class WantedState:
    """What model control asks of one model: loaded (a pinned version, or the newest in the store)
    or unloaded."""

    loaded: bool = True
    version: str | None = None  # None: the newest stored version, followed by refresh_newest

    def to_json(self) -> dict:
        return {"state": "loaded" if self.loaded else "unloaded", "version": self.version}

    @classmethod
    def from_json(cls, data: dict) -> "WantedState":
        return cls(data.get("state", "loaded") == "loaded", data.get("version") or None)


class ModelRepository:
    """Per model: the versions in the store, the loaded handles, and the serving version (what a
    request without a version gets). Model control changes the wanted state (``apply``); a version
    that is replaced or unloaded stops taking requests at once and closes when its running ones
    have finished. A model that fails to load is reported not ready with the reason, and the
    server goes on serving the others (and the previous version of it, if there was one)."""

    def __init__(self, config: ServingConfig, store: ModelStore | None = None,
                 observer_for: Callable[[str], Any] | None = None, drain_timeout: float = 120.0,
                 runners: Runners | None = None, defaults: tuple[str, ...] = (), tasks: Iterable[str] | None = None):
        """``runners``: builds a loaded version's (batcher, task scheduler), the task's business (by
        default a batcher alone); ``defaults`` and ``tasks``: see ``served_names``. Without
        ``config.models``, models of ``tasks`` stored after start-up are found by ``refresh``."""
        self.config = config
        self.store = store or BentoModelStore()
        self.tasks = None if tasks is None else tuple(tasks)
        self.names = served_names(config, self.store, defaults, self.tasks)
        self.drain_timeout = drain_timeout
        self._observer_for = observer_for or (lambda name: None)
        self._runners = runners or (lambda stored, session: (
            model_batcher(stored, session, config, self._observer_for(stored.name)), None))
        self._versions: dict[str, list[StoredVersion]] = {name: [] for name in self.names}
        self._contracts: dict[tuple[str, str], ModelContract] = {}
        self._loaded: dict[tuple[str, str], ModelHandle] = {}
        self._loading: dict[tuple[str, str], asyncio.Lock] = {}
        self._wanted: dict[str, WantedState] = {name: WantedState() for name in self.names}
        self._serving: dict[str, str] = {}  # name -> version serving requests without a version
        self._errors: dict[str, str] = {}  # name -> why its wanted version is not serving
        self._draining: set[asyncio.Task] = set()
        self._control: asyncio.Lock | None = None  # made on first use, inside the event loop
        self._found: set[str] = set()  # stored since start-up, not yet loaded or unloaded by model control

    # ---- what the store holds ------------------------------------------------------------------

    def refresh(self, names: Iterable[str] | None = None) -> None:
        """Re-reads the store's version lists (new exports become known; nothing is loaded). A full
        refresh also finds models stored since start-up (an import), unless ``config.models``
        fixes what is served."""
        if names is None:
            self.discover()
        for name in names or self.names:
            self._versions[name] = self.store.list_versions(name)

    def discover(self) -> list[str]:
        """Adds the store's models of a known task that are not served yet; -> their names. They are
        listed unloaded (readiness does not wait for them) until model control loads them, or the
        periodic refresh does (``refresh_newest``)."""
        if self.config.models or not hasattr(self.store, "list_names"):
            return []
        new = [n for n in self.store.list_names(self.tasks) if n not in self._versions]
        for name in new:
            self.names = (*self.names, name)
            self._versions[name] = []
            self._wanted[name] = WantedState(loaded=False)
            self._found.add(name)
            log.info("found %s in the store: load it with POST /v2/repository/models/%s/load", name, name)
        return new

    def _check_name(self, name: str) -> None:
        if name not in self._versions:
            raise not_found("model", f"unknown model {name!r}; served: {list(self.names)}")

    def versions(self, name: str) -> list[str]:
        """Versions in the store, newest first (as of the last refresh)."""
        self._check_name(name)
        return [v.version for v in self._versions[name]]

    def stored(self, name: str, version: str | None = None) -> StoredVersion:
        """A stored version; without one, the serving version (else the newest in the store)."""
        self._check_name(name)
        versions = self._versions[name]
        if not versions:
            raise not_found("model", f"model {name!r} has no version in the store; export one with "
                                     f"`python -m export {name}`")
        version = version or self._serving.get(name)
        if not version:
            return versions[0]
        for stored in versions:
            if stored.version == version:
                return stored
        raise not_found("version", f"model {name!r} has no version {version!r}; have {[v.version for v in versions]}")

    def contract(self, name: str, version: str | None = None) -> ModelContract:
        """The contract of a version (the serving one by default), read from its artifact without a session."""
        stored = self.stored(name, version)
        key = (stored.name, stored.version)
        loaded = self._loaded.get(key)
        if loaded is not None:
            return loaded.contract
        if key not in self._contracts:
            try:
                self._contracts[key] = read_contract(stored.folder / ONNX_FILE)
            except Exception as exc:  # noqa: BLE001 - a corrupt artifact: not ready, named, never a 500
                raise unavailable("model", load_failure(stored.name, stored.version, exc)) from None
        return self._contracts[key]

    # ---- what is loaded ------------------------------------------------------------------------

    def loaded(self) -> list[ModelHandle]:
        return list(self._loaded.values())

    def serving_version(self, name: str) -> str | None:
        self._check_name(name)
        return self._serving.get(name)

    def is_ready(self, name: str, version: str | None = None) -> bool:
        if not version and name not in self._serving:
            self._check_name(name)
            return False
        stored = self.stored(name, version)
        return (stored.name, stored.version) in self._loaded

    def not_ready(self) -> dict[str, str]:
        """Models wanted loaded that are not serving, with the reason (strict readiness: an
        unloaded model does not count)."""
        return {name: self._errors.get(name, "loading") for name in self.names
                if self._wanted[name].loaded and name not in self._serving}

    def all_ready(self) -> bool:
        return not self.not_ready()

    def _target(self, name: str, version: str | None) -> StoredVersion:
        """``version``, or the newest in the store (not the serving one: what a load means)."""
        self._check_name(name)
        if not version and self._versions[name]:
            return self._versions[name][0]
        return self.stored(name, version)

    def load(self, name: str, version: str | None = None) -> ModelHandle:
        """Opens, warms up and registers a version (newest by default); blocking."""
        stored = self._target(name, version)
        key = (stored.name, stored.version)
        if key in self._loaded:
            return self._loaded[key]
        session = OnnxSession(stored.folder / ONNX_FILE, intra_op_threads=self.config.session_threads,
                              inter_op_threads=self.config.inter_op_threads, providers=self.config.providers)
        session.warm_up()
        runner, engine = self._runners(stored, session)
        handle = ModelHandle(stored, session.contract, runner, engine)
        self._contracts.pop(key, None)  # the handle holds it now
        self._loaded[key] = handle
        log.info("loaded %s (batches of up to %d rows)", stored.tag, handle.runner.max_batch_size)
        return handle

    def start(self, wanted: Mapping[str, WantedState] | None = None) -> list[ModelHandle]:
        """Start-up (blocking): the wanted state (by default every model's newest version). A model
        that cannot be loaded is logged and reported not ready; the others serve."""
        self.refresh()
        self._wanted.update({n: w for n, w in (wanted or {}).items() if n in self._wanted})
        for name in self.names:
            wanted_state = self._wanted[name]
            if not wanted_state.loaded:
                continue
            try:
                self._serving[name] = self.load(name, wanted_state.version).version
                self._errors.pop(name, None)
            except Exception as exc:  # noqa: BLE001 - one bad artifact must not stop the others
                self._errors[name] = load_failure(name, wanted_state.version, exc)
                log.error("%s", self._errors[name])
        return [self._loaded[(n, v)] for n, v in self._serving.items()]

    async def handle(self, name: str, version: str | None = None) -> ModelHandle:
        """A ready handle: the serving version by default; an explicit version not loaded yet (an
        older one) is loaded off the event loop."""
        if not version:
            serving = self._serving.get(name)
            if serving is None:
                self._check_name(name)
                raise self._unavailable(name)
            return self._loaded[(name, serving)]
        if not self._wanted.get(name, WantedState()).loaded:
            raise self._unavailable(name)
        stored = self.stored(name, version)
        handle = self._loaded.get((stored.name, stored.version))
        if handle is not None:
            return handle
        try:
            return await self._load_async(name, stored.version)
        except Exception as exc:
            log.exception("loading %s failed", stored.tag)
            raise unavailable("version", f"{stored.tag} could not be loaded: {type(exc).__name__}") from exc

    def admission_error(self, name: str) -> ServingError | None:
        """Why a request for ``name``'s serving version would be refused now (cheap: asked before a
        request's body is read); None when it would be admitted or the name is not a served model."""
        serving = self._serving.get(name)
        if serving is None:
            return self._unavailable(name) if name in self._wanted else None
        return self._loaded[(name, serving)].admission_error()

    def _unavailable(self, name: str) -> ServingError:
        if not self._wanted[name].loaded:
            return unavailable("model", f"model {name!r} is unloaded; load it with POST /v2/repository/models/"
                                        f"{name}/load")
        return unavailable("model", f"model {name!r} is not ready: {self._errors.get(name, 'loading')}", retry_after=5)

    # ---- model control -------------------------------------------------------------------------

    async def apply(self, wanted: Mapping[str, WantedState]) -> dict[str, str]:
        """Makes the loaded state what ``wanted`` says (models not named keep theirs); -> the errors
        by model name. A newly wanted version is loaded and warmed up off the event loop before it
        takes requests; the one it replaces drains in the background."""
        if self._control is None:
            self._control = asyncio.Lock()
        errors = {}
        async with self._control:
            if any(name not in self._wanted for name in wanted):  # stored since start-up (an import)
                await asyncio.get_running_loop().run_in_executor(None, self.discover)
            for name, state in wanted.items():
                self._check_name(name)
                self._found.discard(name)  # model control decides for it now
                self._wanted[name] = state
                if not state.loaded:
                    self._serving.pop(name, None)
                    self._errors.pop(name, None)
                    self._retire(name, keep=None)
                    continue
                try:
                    await asyncio.get_running_loop().run_in_executor(None, self.refresh, [name])
                    handle = await self._load_async(name, state.version)
                except Exception as exc:  # noqa: BLE001 - reported to the caller and by readiness
                    errors[name] = self._errors[name] = load_failure(name, state.version, exc)
                    log.error("%s", errors[name])
                    continue  # the version serving so far (if any) goes on serving
                self._serving[name] = handle.version
                self._errors.pop(name, None)
                self._retire(name, keep=handle.version)
        return errors

    async def refresh_newest(self) -> dict[str, str]:
        """Periodic refresh: every model that follows the newest stored version switches to a newer
        one found in the store."""
        await asyncio.get_running_loop().run_in_executor(None, self.refresh, None)
        for name in self._found:  # polling serves new models, as Triton's poll mode does
            self._wanted[name] = WantedState()
        self._found.clear()
        stale = {name: state for name, state in self._wanted.items()
                 if state.loaded and state.version is None and self._versions[name]
                 and self._serving.get(name) != self._versions[name][0].version and name not in self._errors}
        return await self.apply(stale) if stale else {}

    def index(self) -> list[dict]:
        """Every stored version of every served model with its state (READY, UNAVAILABLE) and why
        (the Open Inference Protocol repository index)."""
        entries = []
        for name in self.names:
            wanted = self._wanted[name]
            for stored in self._versions[name]:
                key = (name, stored.version)
                if key in self._loaded:
                    state, reason = "READY", ("serving" if self._serving.get(name) == stored.version
                                              else "loaded (asked for by version)")
                elif not wanted.loaded:
                    state, reason = "UNAVAILABLE", "unloaded"
                elif name in self._errors and (wanted.version or self._versions[name][0].version) == stored.version:
                    state, reason = "UNAVAILABLE", self._errors[name]
                else:
                    state, reason = "UNAVAILABLE", "not loaded (loads when asked for by version)"
                entries.append({"name": name, "version": stored.version, "state": state, "reason": reason})
            if not self._versions[name]:
                entries.append({"name": name, "version": "", "state": "UNAVAILABLE", "reason": "not in the store"})
        return entries

    async def _load_async(self, name: str, version: str | None) -> ModelHandle:
        """``load`` off the event loop, once per version however many ask at the same time."""
        target = self._target(name, version)
        key = (name, target.version)
        lock = self._loading.setdefault(key, asyncio.Lock())
        async with lock:
            if key not in self._loaded:
                await asyncio.get_running_loop().run_in_executor(None, self.load, name, target.version)
        return self._loaded[key]

    def _retire(self, name: str, keep: str | None) -> None:
        """Every loaded version of ``name`` but ``keep`` stops taking requests now and closes once
        the ones it already has are done."""
        for key in [k for k in self._loaded if k[0] == name and k[1] != keep]:
            handle = self._loaded.pop(key)
            log.info("retiring %s once its running requests finish", handle.tag)
            task = asyncio.get_running_loop().create_task(handle.drain(self.drain_timeout))
            self._draining.add(task)
            task.add_done_callback(self._draining.discard)

    async def unload(self, name: str, version: str) -> None:
        handle = self._loaded.pop((name, version), None)
        if handle is not None:
            if self._serving.get(name) == version:
                del self._serving[name]
            await handle.close()

    async def close(self) -> None:
        for key in list(self._loaded):
            await self.unload(*key)
        for task in list(self._draining):
            task.cancel()

PATH = re.compile(r"(?:/[\w.@+-]+){2,}/?")


def without_paths(text: str) -> str:
    """Error text for clients and probes: filesystem paths (the store's layout, the user's home)
    cut down to their last part."""
    return PATH.sub(lambda m: ".../" + m.group().rstrip("/").rsplit("/", 1)[-1], text)


def load_failure(name: str, version: str | None, exc: BaseException) -> str:
    """One line naming the model, the version and what went wrong (no stack trace, no paths)."""
    detail = without_paths(str(exc).strip().splitlines()[0]) if str(exc).strip() else ""
    what = f"{name}:{version}" if version else f"{name} (newest)"
    return f"model {what} could not be loaded: {type(exc).__name__}: {detail[:300]}"
