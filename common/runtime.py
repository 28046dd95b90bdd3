"""The one ONNX Runtime session wrapper: providers, threads, warm-up. A model is known here only
through its artifact: the ONNX file plus the contract stored in its metadata."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from contract import CONTRACT_KEY, ModelContract, TensorSpec

log = logging.getLogger("common.runtime")


def read_contract(onnx_path: Path) -> ModelContract:
    """The contract export wrote into the file's ``metadata_props``, without opening a session
    (for versions that are listed but not loaded)."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    if CONTRACT_KEY not in props:
        raise ValueError(f"{onnx_path} has no {CONTRACT_KEY!r} metadata; export it with `python -m export`")
    return ModelContract.from_json(props[CONTRACT_KEY])


def choose_providers(wanted: tuple[str, ...] = ()) -> list[str]:
    available = ort.get_available_providers()
    chosen = [p for p in (wanted or ("CUDAExecutionProvider", "CPUExecutionProvider")) if p in available]
    if "CUDAExecutionProvider" in chosen:
        preload_cuda_libraries()
    return chosen or ["CPUExecutionProvider"]


@functools.cache  # once per process, not per session
def preload_cuda_libraries() -> None:
    """The GPU image takes CUDA and cuDNN from their pip wheels (onnxruntime-gpu[cuda,cudnn]), which
    the dynamic loader does not search; ONNX Runtime loads them from site-packages when asked."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as exc:  # noqa: BLE001 - a system CUDA install may still serve; the session says
            log.warning("onnxruntime.preload_dlls failed: %s", exc)


class OnnxSession:
    """One ONNX Runtime session for one model version. ``run`` is thread-safe (ONNX Runtime allows
    concurrent ``run`` calls on one session) and releases the GIL while it computes."""

    def __init__(self, onnx_path: Path, *, intra_op_threads: int = 1, inter_op_threads: int = 1,
                 providers: tuple[str, ...] = (), spinning: bool = False):
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = inter_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # No CPU arena: the arena keeps whatever its largest run grew it to (a worker sat at 4.3 GB
        # after one 2000x2000 /denoise); plain malloc gives it back (services/budget.py tunes glibc).
        options.enable_cpu_mem_arena = False
        # Spinning threads burn the cores the HTTP stack needs between runs (2-core machines).
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
        requested = choose_providers(providers)
        self.session = ort.InferenceSession(str(onnx_path), options, providers=requested)
        # What the session really got (CUDA can fail to initialise and fall back silently).
        self.providers = self.session.get_providers()
        # The session has parsed the file already: its metadata holds the contract.
        metadata = self.session.get_modelmeta().custom_metadata_map
        if CONTRACT_KEY not in metadata:
            raise ValueError(f"{onnx_path} has no {CONTRACT_KEY!r} metadata; export it with `python -m export`")
        self.contract = contract = ModelContract.from_json(metadata[CONTRACT_KEY])
        self._output_names = [t.name for t in contract.outputs]
        log.info("%s on %s (requested %s, %d intra-op threads)", contract.name, self.providers, requested,
                 intra_op_threads)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._output_names, self.session.run(self._output_names, feeds)))

    def warm_up(self) -> None:
        """One run on a small input of the right shape, so the first request does not pay for it."""
        feeds = {}
        for spec in self.contract.inputs:
            shape = [d if d >= 0 else _warm_dim(self.contract, spec, i) for i, d in enumerate(spec.shape)]
            feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
        self.run(feeds)


def _warm_dim(contract: ModelContract, spec: TensorSpec, axis: int) -> int:
    name = spec.axis_names[axis] if axis < len(spec.axis_names) else ""
    if contract.image is not None and name in ("height", "width"):
        return max(contract.image.height, contract.image.multiple_of, contract.limits.get("min_side", 1))
    return 0 if name == "past_sequence" else 1
