"""The one ONNX Runtime session wrapper, and the hub of served models read from the BentoML store.

A model is known here only through its artifact: the ONNX file plus the contract stored in it."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from contract import CONTRACT_KEY, ONNX_FILE, ModelContract, TensorSpec
from services.errors import NotFoundError, RequestError

log = logging.getLogger("services.runtime")
FAMILIES = ("classify", "segment", "generate", "denoise", "sample")


@dataclass(frozen=True)
class RuntimeSettings:
    """Thread counts and provider choice, from the environment (SUITE_*) so containers can tune them."""

    intra_op_threads: int = 0  # 0 = ONNX Runtime's default (one per core)
    inter_op_threads: int = 1
    providers: tuple[str, ...] = ()  # empty = CUDA when usable, else CPU

    @classmethod
    def from_env(cls) -> "RuntimeSettings":
        providers = tuple(p for p in os.environ.get("SUITE_ORT_PROVIDERS", "").split(",") if p)
        return cls(int(os.environ.get("SUITE_INTRA_OP_THREADS", "0")),
                   int(os.environ.get("SUITE_INTER_OP_THREADS", "1")), providers)


def choose_providers(settings: RuntimeSettings) -> list[str]:
    available = ort.get_available_providers()
    wanted = list(settings.providers) or ["CUDAExecutionProvider", "CPUExecutionProvider"]
    chosen = [p for p in wanted if p in available]
    return chosen or ["CPUExecutionProvider"]


class StoredModel:
    """A model version in the store, known through its artifact: the contract read from the ONNX
    file's metadata and the store's metadata. Checks inputs; runs nothing."""

    def __init__(self, name: str, version: str, folder: Path, metadata: dict):
        self.name, self.version, self.folder, self.metadata = name, version, Path(folder), metadata
        proto = onnx.load(str(self.folder / ONNX_FILE), load_external_data=False)
        self.contract = ModelContract.from_json({p.key: p.value for p in proto.metadata_props}[CONTRACT_KEY])
        self._inputs = {t.name: t for t in self.contract.inputs}

    @property
    def tag(self) -> str:
        return f"{self.name}:{self.version}"

    def check(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validates names, dtypes and shapes against the contract; raises RequestError naming the tensor."""
        missing = [n for n in self._inputs if n not in feeds]
        if missing:
            raise RequestError(missing[0], f"missing input tensor; {self.name} needs {list(self._inputs)}")
        unknown = [n for n in feeds if n not in self._inputs]
        if unknown:
            raise RequestError(unknown[0], f"unknown input tensor; {self.name} takes {list(self._inputs)}")
        for name, array in feeds.items():
            spec = self._inputs[name]
            if array.dtype != np.dtype(spec.dtype):
                raise RequestError(name, f"datatype {array.dtype} given, {spec.dtype} ({spec.oip_datatype}) expected")
            if not shape_matches(spec, array.shape):
                raise RequestError(name, f"shape {list(array.shape)} does not match {spec.shape}")
        return feeds


class OnnxModel(StoredModel):
    """One session: providers, threads, warm-up, and input checks against the contract."""

    def __init__(self, stored: StoredModel, settings: RuntimeSettings):
        self.__dict__.update(stored.__dict__)
        options = ort.SessionOptions()
        options.intra_op_num_threads = settings.intra_op_threads
        options.inter_op_num_threads = settings.inter_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        requested = choose_providers(settings)
        self.session = ort.InferenceSession(str(self.folder / ONNX_FILE), options, providers=requested)
        # What the session really got (CUDA can fail to initialise and fall back silently).
        self.providers = self.session.get_providers()
        log.info("model %s on %s (requested %s)", self.tag, self.providers, requested)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(None, self.check(feeds))
        return {t.name: out for t, out in zip(self.contract.outputs, outputs)}

    def warm_up(self) -> None:
        """One run on a small input of the right shape, so the first request does not pay for it."""
        feeds = {}
        for spec in self.contract.inputs:
            shape = [d if d >= 0 else (1 if i == 0 else _warm_dim(self.contract, spec, i)) for i, d in enumerate(spec.shape)]
            feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
        self.session.run(None, feeds)


def _warm_dim(contract: ModelContract, spec: TensorSpec, axis: int) -> int:
    if contract.image is not None and spec.axis_names[axis] in ("height", "width"):
        return max(contract.image.height, contract.image.multiple_of, contract.limits.get("min_side", 1))
    return 0 if spec.axis_names[axis] == "past_sequence" else 1


def shape_matches(spec: TensorSpec, shape: tuple[int, ...]) -> bool:
    return len(shape) == len(spec.shape) and all(d < 0 or d == s for d, s in zip(spec.shape, shape))


class ModelHub:
    """Every served model by name, with each version in the store addressable; newest by default.
    Versions are opened lazily, once, and kept."""

    def __init__(self, names: tuple[str, ...] = FAMILIES, settings: RuntimeSettings | None = None):
        self.names = names
        self.settings = settings or RuntimeSettings.from_env()
        self._loaded: dict[tuple[str, str], OnnxModel] = {}
        self._described: dict[tuple[str, str], StoredModel] = {}
        self._versions: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def versions(self, name: str) -> list[str]:
        """Newest first. Read from the store once per name and kept: a server serves the versions it
        started with (restart to pick up new ones), and the hot path never lists the store."""
        import bentoml

        if name not in self.names:
            raise NotFoundError("model", f"unknown model {name!r}; served: {list(self.names)}")
        if name not in self._versions:
            models = sorted(bentoml.models.list(name), key=lambda m: m.info.creation_time, reverse=True)
            self._versions[name] = [m.tag.version for m in models]
        return self._versions[name]

    def describe(self, name: str, version: str | None = None) -> StoredModel:
        """Contract and metadata of a version (newest by default) without opening a session."""
        import bentoml
        from bentoml.exceptions import NotFound

        versions = self.versions(name)
        if not versions:
            raise NotFoundError("model", f"model {name!r} is not in the store")
        version = version or versions[0]
        if version not in versions:
            raise NotFoundError("version", f"model {name!r} has no version {version!r}; have {versions}")
        key = (name, version)
        with self._lock:
            if key not in self._described:
                try:
                    stored = bentoml.models.get(f"{name}:{version}")
                except NotFound as exc:  # removed since versions() looked
                    raise NotFoundError("version", str(exc)) from exc
                self._described[key] = StoredModel(name, version, Path(stored.path), dict(stored.info.metadata))
            return self._described[key]

    def get(self, name: str, version: str | None = None) -> OnnxModel:
        """An open, warmed-up session for a version (newest by default), opened once and kept."""
        stored = self.describe(name, version)
        key = (name, stored.version)
        with self._lock:
            if key not in self._loaded:
                model = OnnxModel(stored, self.settings)
                model.warm_up()
                self._loaded[key] = model
            return self._loaded[key]

    def latest(self) -> dict[str, OnnxModel]:
        return {name: self.get(name) for name in self.names}
