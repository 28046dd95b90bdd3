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
    from common.runtime import OnnxSession

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


class FakeRepository:
    """What routing reads of a repository: names, stored metadata, readiness, configuration."""

    def __init__(self, config, stored: dict[str, dict], ready: set[str]):
        self.config, self._stored, self._ready = config, stored, ready
        self.names = tuple(stored)

    def versions(self, name):
        return ["v1"]

    def stored(self, name):
        from types import SimpleNamespace

        return SimpleNamespace(metadata=self._stored[name])

    def is_ready(self, name, version=None):
        return name in self._ready


@pytest.mark.parametrize("environ, cuda, expected", [
    ({}, False, "classify-int8"),  # auto on a CPU: the variant its gate measured fastest
    ({}, True, "classify-fp16"),  # auto on CUDA: fp16
    ({"SUITE_VARIANT": "fp32"}, False, "classify"),
    ({"SUITE_MODEL_VARIANTS": "classify=fp16"}, False, "classify-fp16"),
    ({"SUITE_VARIANT": "fp16", "SUITE_MODEL_VARIANTS": "classify=int8"}, True, "classify-int8"),
])
def test_configuration_picks_the_variant(environ, cuda, expected):
    from services.config import ServingConfig
    from services.dataplane import DataPlane

    stored = {"classify": {"variant": "fp32"},
              "classify-int8": {"variant": "int8", "variant_of": "classify", "gate": {"speedup": 1.6}},
              "classify-fp16": {"variant": "fp16", "variant_of": "classify", "gate": {"speedup": 0.4}},
              "segment": {}}
    plane = DataPlane(FakeRepository(ServingConfig.load(environ, {}), stored, set(stored)))
    plane._cuda = cuda
    assert plane.route("classify") == expected
    assert plane.route("segment") == "segment"  # no variants: itself


def test_a_variant_not_ready_falls_back_to_fp32():
    from services.config import ServingConfig
    from services.dataplane import DataPlane

    stored = {"classify": {}, "classify-int8": {"variant": "int8", "variant_of": "classify", "gate": {"speedup": 2.0}}}
    plane = DataPlane(FakeRepository(ServingConfig.load({}, {}), stored, {"classify"}))
    plane._cuda = False
    assert plane.route("classify") == "classify"


def test_bad_variant_configuration_is_refused():
    from services.config import ServingConfig

    with pytest.raises(ValueError, match="variant"):
        ServingConfig.load({"SUITE_VARIANT": "int4"}, {})
    with pytest.raises(ValueError, match="variant"):
        ServingConfig.load({"SUITE_MODEL_VARIANTS": "classify:int8"}, {})


def test_int8_keeps_the_excluded_layers_fp32(tmp_path):
    """The sensitivity search's tool: a node named in ``exclude`` keeps its float weights; the
    others read theirs through DequantizeLinear (static QDQ)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from export.variants import quantizable_nodes, quantize_int8

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((4, c, 3, 3)).astype(np.float32), f"w{i}")
               for i, c in enumerate((1, 4))]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w0"], ["h"], name="first", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("Conv", ["r", "w1"], ["y"], name="last", pads=[1, 1, 1, 1])],
        "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], weights)
    source = tmp_path / "two.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)
    assert quantizable_nodes(source, ("Conv",)) == ["first", "last"]
    calibration = [{"x": rng.standard_normal((1, 1, 8, 8)).astype(np.float32)} for _ in range(4)]
    method = quantize_int8(source, tmp_path / "int8.onnx", calibration, ("Conv",), "static", ["last"])
    assert "fp32 kept for last" in method
    quantized = onnx.load(str(tmp_path / "int8.onnx")).graph
    producers = {out: node.op_type for node in quantized.node for out in node.output}
    convs = {node.name: node for node in quantized.node if node.op_type == "Conv"}
    assert producers.get(convs["first"].input[1]) == "DequantizeLinear"
    assert convs["last"].input[1] == "w1" and "w1" in {init.name for init in quantized.initializer}


def test_quantization_aware_fine_tuning_folds_norms_and_leaves_plain_weights():
    """export/qat.py: folding a batch norm into its convolution changes no output; the fine-tuned
    copy has no norms, no fake quantization left on it, new weights, and a lower loss under int8
    rounding than the folded model had; the source model is untouched."""
    import itertools

    import torch
    from torch import nn
    from torch.nn.utils import parametrize

    from export.qat import fake_quantized, finetune_for_int8, fold_batch_norms
    from training.family import Data

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 1, 3, padding=1))
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.rand(2, 1, 12, 12)
    folded = fold_batch_norms(__import__("copy").deepcopy(model))
    assert isinstance(folded[1], nn.Identity)
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)

    class Target:  # denoise-like: learn to halve the input
        @staticmethod
        def loss(m, batch):
            return nn.functional.mse_loss(m(batch), batch * 0.5)

    batches = (torch.rand(4, 1, 12, 12) for _ in itertools.count())
    data = Data(batches, None, "fp", "random")
    rounded = fold_batch_norms(__import__("copy").deepcopy(model))
    fake_quantized(rounded)
    probe = torch.rand(16, 1, 12, 12)
    before = float(Target.loss(rounded, probe))
    tuned = finetune_for_int8(Target(), model, data, steps=200, lr=1e-2)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in tuned.modules())
    assert not any(parametrize.is_parametrized(m) for m in tuned.modules())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in tuned.modules())
    assert isinstance(model[1], nn.BatchNorm2d)  # the source model is not folded in place
    requantized = __import__("copy").deepcopy(tuned)
    fake_quantized(requantized)
    assert float(Target.loss(requantized, probe)) < before
