"""Per-runtime variants on the quick models: every family's int8 and fp16 variant either passes its
gate (its figure within the family's tolerance of fp32's, int8 faster than fp32 here) and is written
with its contract, or is refused for a stated reason with nothing written."""

from __future__ import annotations

import pytest

from contract import ModelContract
from export.variants import VariantRefused, export_variant, variant_file
from training.artifacts import family_dir
from training.registry import FAMILIES


@pytest.fixture(scope="module")
def decisions(built_models):
    out = {}
    for name, family in FAMILIES.items():
        for variant in ("int8", "fp16"):
            try:
                out[name, variant] = export_variant(family, family_dir(name), variant)
            except VariantRefused as refused:
                out[name, variant] = refused
    return out


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("variant", ["int8", "fp16"])
def test_variant_passes_its_gate_or_is_refused_with_a_reason(decisions, name, variant):
    from services.runtime import OnnxSession

    decision = decisions[name, variant]
    family = FAMILIES[name]
    path = family_dir(name) / variant_file(variant)
    gate = decision.gate
    assert gate.metric == family.primary_metric and gate.fp32_ms > 0 and gate.variant_ms > 0
    if isinstance(decision, VariantRefused):
        assert not path.exists(), "a refused variant leaves no file"
        assert gate.loss > gate.tolerance or (variant == "int8" and gate.speedup <= 1.0), gate
        assert "more than the tolerance" in str(decision) or "slower than fp32" in str(decision)
        return
    assert gate.passed and gate.loss <= gate.tolerance
    if variant == "int8":
        assert gate.speedup > 1.0
    contract: ModelContract = OnnxSession(path).contract
    assert contract.name == f"{name}-{variant}" and contract.extra["variant"] == variant
    assert contract.extra["variant_of"] == name
    # The variant keeps the fp32 graph's interface: the same inputs and outputs, the same dtypes.
    base = OnnxSession(family_dir(name) / "model.onnx").contract
    assert [(t.name, t.dtype) for t in contract.inputs] == [(t.name, t.dtype) for t in base.inputs]
    assert [(t.name, t.dtype) for t in contract.outputs] == [(t.name, t.dtype) for t in base.outputs]


def test_export_cli_variant_all_reports_every_decision(built_models, capsys):
    from export.__main__ import main

    assert main(["classify", "--variant", "all", "--no-store"]) == 0
    out = capsys.readouterr().out
    assert "[classify] " in out and "[classify-int8] " in out and "[classify-fp16] " in out
