"""The one export routine for every family: torch.export-based ONNX export, onnx.checker, contract
in ``metadata_props``, ONNX Runtime parity against PyTorch on held-out inputs, atomic write."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from common.files import atomic_write
from contract import CONTRACT_KEY, ONNX_FILE, ModelContract
from training.artifacts import family_dir, git_revision
from training.family import ExportSpec, Family
from export.memory import measure as measure_memory
from training.loop import load_checkpoint

log = logging.getLogger(__name__)
# Max abs difference allowed between ONNX Runtime and PyTorch, fp32; for integer outputs (argmax
# decisions such as a mask) the share of elements that differ, since a near-tie (a 1e-7 logit
# margin, seen on CamVid) may fall either way.
PARITY_TOLERANCE = 1e-4


class ParityError(RuntimeError):
    pass


@dataclass
class ExportResult:
    family: str
    onnx_path: Path
    contract: ModelContract
    parity_max_abs_diff: float
    checkpoint: dict


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def parity(session: ort.InferenceSession, module: torch.nn.Module, inputs: list[tuple[torch.Tensor, ...]],
           input_names: list[str], references: list[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]] = ()) -> float:
    """Max abs difference over every output of every held-out input against PyTorch on the same
    input, and against each reference's expected outputs where those are not NaN; for integer
    outputs, the share of elements that differ."""
    pairs = []
    for example in inputs:
        with torch.no_grad():
            expected = module(*example)
        pairs.append((example, expected if isinstance(expected, tuple) else (expected,)))
    worst = 0.0
    for example, expected in [*pairs, *references]:
        got = session.run(None, {n: _to_numpy(t) for n, t in zip(input_names, example)})
        for e, g in zip(expected, got):
            e = _to_numpy(e)
            if e.shape != g.shape:
                raise ParityError(f"output shape {g.shape} from ONNX Runtime, {e.shape} expected")
            if np.issubdtype(e.dtype, np.integer):
                worst = max(worst, float(np.mean(e != g)) if e.size else 0.0)
                continue
            e = e.astype(np.float64)
            compared = ~np.isnan(e)
            if compared.any():
                worst = max(worst, float(np.max(np.abs(e[compared] - g.astype(np.float64)[compared]))))
    return worst


def export_onnx(family: Family, ckpt_dir: Path | None = None, tolerance: float = PARITY_TOLERANCE) -> ExportResult:
    ckpt_dir = ckpt_dir or family_dir(family.name)
    model, cfg, checkpoint = load_checkpoint(family, ckpt_dir)
    spec = family.export_spec(model, cfg, checkpoint)
    # A benchmark model keeps its own name (generate-shakespeare) beside the family's default one.
    contract = dataclasses.replace(family.contract(cfg, checkpoint, ckpt_dir), name=checkpoint.get("name", family.name))
    meta = {"family": family.name, "metrics": json.dumps(checkpoint["metrics"])}
    started = time.monotonic()
    contract, diff = export_module(spec, contract, meta, ckpt_dir / ONNX_FILE, tolerance)
    log.info("%s: exported %s in %.1fs, parity max abs diff %.2e", family.name, ckpt_dir / ONNX_FILE,
             time.monotonic() - started, diff)
    return ExportResult(family.name, ckpt_dir / ONNX_FILE, contract, diff, checkpoint)


def export_module(spec: ExportSpec, contract: ModelContract, meta: dict[str, str], out_path: Path,
                  tolerance: float = PARITY_TOLERANCE) -> tuple[ModelContract, float]:
    """The one export routine: a torch module (``spec``) to single-file ONNX through torch.export,
    ``onnx.checker``, the contract in ``metadata_props``, ONNX Runtime against PyTorch on the
    spec's held-out inputs, the graph's memory per unit measured; written atomically, and not at
    all when parity fails. -> (the contract as stored, parity max abs diff)."""
    if [t.name for t in contract.inputs] != spec.input_names or [t.name for t in contract.outputs] != spec.output_names:
        raise ValueError(f"{contract.name}: contract tensor names differ from the exported graph's")

    def write(tmp: Path) -> None:
        program = torch.onnx.export(spec.module.eval(), spec.example_inputs, input_names=spec.input_names,
                                    output_names=spec.output_names, dynamic_shapes=spec.dynamic_shapes,
                                    dynamo=True, external_data=False, optimize=True, verbose=False)
        proto = program.model_proto
        onnx.checker.check_model(proto, full_check=True)
        done[:] = finish_artifact(proto, contract, meta, tmp, lambda session: parity(
            session, spec.module, spec.parity_inputs, spec.input_names, spec.reference_checks), tolerance)

    done: list = []
    atomic_write(out_path, write)
    return done[0], done[1]


def finish_artifact(proto: onnx.ModelProto, contract: ModelContract, meta: dict[str, str], tmp: Path,
                    check, tolerance: float) -> tuple[ModelContract, float]:
    """Writes ``proto`` to ``tmp`` with the contract in its metadata, runs ``check(session)`` (the
    parity figure) on what was written, refuses it past ``tolerance``, then measures the graph's
    memory per pixel or row for serving's budget (export/memory.py) and stores that in the contract."""

    def save(contract: ModelContract) -> None:
        props = {CONTRACT_KEY: contract.to_json(), "git_revision": git_revision(), **meta}
        del proto.metadata_props[:]
        for key, value in props.items():
            proto.metadata_props.add(key=key, value=value)
        onnx.save_model(proto, str(tmp), save_as_external_data=False)

    save(contract)
    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    diff = check(session)
    del session
    if diff > tolerance:
        raise ParityError(f"{contract.name}: ONNX Runtime differs from the source by {diff:.3g} > {tolerance:g}; "
                          "nothing was written")
    memory = measure_memory(tmp)
    if memory:
        contract = dataclasses.replace(contract, limits={**contract.limits, **memory})
        save(contract)
    return contract, diff


def store_metadata(family: Family, ckpt: dict, contract: ModelContract, parity_max_abs_diff: float | None) -> dict:
    """What the store keeps beside a model's files (and /models, OIP metadata show); no parity
    figure for a variant (its gate says how it compares with fp32)."""
    metadata = {
        "family": family.name,
        "task": family.task,
        "architecture": contract.architecture,
        "profile": ckpt["profile"],
        "metrics": ckpt["metrics"],
        "benchmark": ckpt.get("benchmark", {}),  # figures on the benchmark's standard split (Set12 PSNR)
        "primary_metric": family.primary_metric,
        "parity_max_abs_diff": parity_max_abs_diff,
        "data_fingerprint": ckpt["data"]["fingerprint"],
        "data_description": ckpt["data"]["description"],
        "git_revision": git_revision(),
        "graph_version": family.graph_version,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model_config": ckpt["model_config"],
        "train_config": ckpt["train_config"],
    }
    if parity_max_abs_diff is None:
        del metadata["parity_max_abs_diff"]
    return metadata


def save_to_store(result: ExportResult, family: Family, ckpt_dir: Path | None = None) -> str:
    """Adds the ONNX file (and e.g. the tokenizer) as a new version in the BentoML model store."""
    metadata = {**store_metadata(family, result.checkpoint, result.contract, result.parity_max_abs_diff),
                "variant": "fp32"}
    return store_files(result.contract.name, family, metadata, result.onnx_path,
                       ckpt_dir or family_dir(result.contract.name))


def store_files(name: str, family: Family, metadata: dict, onnx_path: Path, ckpt_dir: Path, **labels: str) -> str:
    """A new store version of ``name``: the ONNX file as model.onnx and the family's extra files."""
    return store_model(name, {"family": family.name, "task": family.task, **labels}, metadata, onnx_path,
                       [ckpt_dir / extra for extra in family.extra_files()])


def store_model(name: str, labels: dict[str, str], metadata: dict, onnx_path: Path, extra_files: list[Path] = ()) -> str:
    """A new version of ``name`` in the BentoML store (``onnx_path`` as model.onnx, the extra files
    beside it); -> its tag. The store writes into a temporary folder and commits it whole, so a
    failure leaves nothing behind."""
    import bentoml

    # The context manager only commits the model to the store if the block finishes.
    with bentoml.models.create(name, labels=labels, metadata=metadata) as stored:
        shutil.copy2(onnx_path, stored.path_of(ONNX_FILE))
        for extra in extra_files:
            shutil.copy2(extra, stored.path_of(extra.name))
    return str(stored.tag)
