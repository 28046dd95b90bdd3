"""Per family, parametrized over the registry: a quick-profile run clearly beats chance, and the
exported ONNX model matches PyTorch."""

from __future__ import annotations

import math

import onnx
import pytest

from contract import CONTRACT_KEY, ModelContract
from export.onnx_export import PARITY_TOLERANCE
from training.artifacts import family_dir
from training.registry import FAMILIES


def contract_of(name: str) -> tuple[onnx.ModelProto, ModelContract]:
    proto = onnx.load(str(family_dir(name) / "model.onnx"))
    return proto, ModelContract.from_json({p.key: p.value for p in proto.metadata_props}[CONTRACT_KEY])


def chance_level(name: str) -> float:
    """What a model that learnt nothing would score on the family's primary metric."""
    if name == "classify":
        return 0.1
    if name == "segment":
        return 0.25  # predicting background everywhere: IoU 1 on one class of four
    if name == "generate":  # uniform over the vocabulary, in nats per character
        vocab = contract_of(name)[1].output("logits").shape[-1]
        return math.log(vocab) / 2.5  # byte-level BPE on English packs >= 2.5 characters a token
    if name == "denoise":
        return 0.0  # returning the noisy input gains no PSNR
    if name == "sample":
        return 0.1
    raise KeyError(name)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_quick_training_beats_chance(name, built_models):
    family = FAMILIES[name]
    value = built_models[name].metrics[family.primary_metric]
    chance = chance_level(name)
    if family.higher_is_better:
        assert value > chance + 0.1 * max(abs(chance), 1), f"{name}: {value} vs chance {chance}"
    else:
        assert value < 0.9 * chance, f"{name}: {value} vs chance {chance}"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_export_parity_and_contract_in_artifact(name, built_models):
    assert 0 <= built_models[name].parity <= PARITY_TOLERANCE
    proto, contract = contract_of(name)
    onnx.checker.check_model(proto)
    assert contract.family == name
    assert [i.name for i in proto.graph.input] == [t.name for t in contract.inputs]
    assert [o.name for o in proto.graph.output] == [t.name for t in contract.outputs]
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param, "batch axis must be dynamic"


def test_store_metadata(built_models):
    import bentoml

    for name, built in built_models.items():
        meta = bentoml.models.get(built.tag).info.metadata
        for key in ("metrics", "parity_max_abs_diff", "data_fingerprint", "git_revision", "created_at"):
            assert key in meta, (name, key)
        assert meta["metrics"][FAMILIES[name].primary_metric] == built.metrics[FAMILIES[name].primary_metric]


def test_classify_ood_detector_tells_digits_from_other_images(built_models):
    """The digit autoencoder, calibrated on the held-out digits, scores photo crops, scenes and
    typed digits above the held-out digits more often than chance; the exported graph returns its
    error and score beside the probabilities."""
    metrics = built_models["classify"].metrics
    assert metrics["ood_auroc"] > 0.6, metrics
    assert all(metrics[f"ood_auroc_{s}"] > 0.5 for s in ("photos", "scenes", "typed")), metrics
    _, contract = contract_of("classify")
    assert [t.name for t in contract.outputs] == ["probabilities", "reconstruction_error", "ood_score"]
