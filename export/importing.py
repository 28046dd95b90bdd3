"""What every import shares, image models (``export.imports``) and causal language models
(``export.causal_lm``) alike: the refusal naming what does not fit, the model's name, and storing
the import and its int8 variant as new versions in the model store."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from contract import MODEL_NAME, ModelContract


class ImportRefused(ValueError):
    """The model does not fit its spec or the suite; the message names what. Nothing was written."""


def check_name(name: str) -> str:
    if not MODEL_NAME.fullmatch(name):
        raise ImportRefused(f"--name {name!r}: a model name is lower-case letters, digits, '.', '_', '-' "
                            "(at most 63 characters)")
    return name


def default_name(path: Path) -> str:
    stem = path.stem if path.suffix == ".onnx" else path.name
    return re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._")[:63] or "imported"


def store_import(contract: ModelContract, onnx_path: Path, parity_max_abs_diff: float, origin: dict,
                 extra_files: list[Path] = ()) -> str:
    """The written graph as a new version of ``contract.name``; -> its tag."""
    from export.onnx_export import store_model
    from training.artifacts import git_revision

    metadata = {"family": contract.family, "task": contract.task, "source": contract.family,
                "architecture": contract.architecture, "parity_max_abs_diff": parity_max_abs_diff,
                "git_revision": git_revision(), "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "variant": "fp32", "metrics": {}, "benchmark": {},
                # what it was imported from, as JSON text (the store's metadata takes no None)
                "import": json.dumps(origin, default=list, sort_keys=True)}
    return store_model(contract.name, {"task": contract.task, "source": contract.family}, metadata, onnx_path,
                       list(extra_files))


def settle_int8_gate(gate, quality_shortfall: str | None) -> None:
    """An int8 gate's verdict (image and text variants alike): refused (``VariantRefused``, with
    the figures) when its quality falls short or it is not faster than fp32 here, else passed."""
    from export.variants import VariantRefused

    if quality_shortfall:
        gate.reason = quality_shortfall
    elif gate.speedup <= 1.0:
        gate.reason = f"slower than fp32 on this CPU ({gate.variant_ms:.2f} ms against {gate.fp32_ms:.2f} ms)"
    if gate.reason:
        raise VariantRefused(f"refused: {gate.reason}; nothing was written ({gate.summary()})", gate)
    gate.passed, gate.reason = True, "passed"


def store_int8_variant(variant_name: str, stored, contract: ModelContract, gate, path: Path,
                       extra_files: list[Path] = ()) -> str:
    """A passed int8 variant as a new store version, its gate and origin in the metadata; -> its tag."""
    from export.onnx_export import store_model

    metadata = {**{k: v for k, v in stored.info.metadata.items() if k != "parity_max_abs_diff"},
                "variant": "int8", "variant_of": stored.tag.name, "gate": json.loads(json.dumps(gate.as_dict())),
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return store_model(variant_name, {"task": contract.task, "source": contract.family, "variant": "int8"},
                       metadata, path, list(extra_files))
