"""Per-runtime variants of an exported model, each behind its own gate.

- ``int8`` (CPU): ONNX Runtime quantization of the fp32 graph after ``quant_pre_process``; dynamic
  (weights int8, activations quantized on the fly) or static (QDQ, activation ranges calibrated
  on the family's own training batches), with the op types the family names.
- ``fp16`` (GPU): weights and compute in fp16, inputs and outputs kept as the contract has them;
  checked here on the CPU provider (slowly: ONNX Runtime's CPU kernels are fp32, so it casts).

The gate runs the family's own held-out evaluation through ONNX Runtime on both graphs (the
family's ``graph_model`` stands the graph in for the PyTorch model) and times both on the export
inputs. A variant is refused, and nothing is written, when its figure falls more than the
family's ``variant_tolerance`` below fp32's, or, for int8, when it is not faster than fp32 on this
machine. A kept variant is its own model in the store, ``<name>-<variant>``, with the contract,
the variant and the gate in its metadata, served beside the fp32 model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from common.files import atomic_write
from contract import CONTRACT_KEY, ONNX_FILE, ModelContract
from training.config import TrainConfig
from training.family import Family
from training.loop import load_checkpoint

log = logging.getLogger(__name__)
VARIANTS = ("fp32", "int8", "fp16")
TIMING_REPEATS = 30


class VariantRefused(RuntimeError):
    """The variant failed its gate; ``gate`` says by how much."""

    def __init__(self, message: str, gate: "Gate"):
        super().__init__(message)
        self.gate = gate


@dataclass
class Gate:
    variant: str
    metric: str
    fp32: float
    value: float
    tolerance: float
    higher_is_better: bool
    fp32_ms: float  # median time of the export inputs on the CPU provider, one thread
    variant_ms: float
    method: str
    passed: bool = False
    reason: str = ""
    timed_on: str = "the export inputs"  # what both graphs were timed on

    @property
    def speedup(self) -> float:
        return self.fp32_ms / self.variant_ms

    @property
    def loss(self) -> float:
        """How much worse than fp32, in the metric's units (negative: better)."""
        return self.fp32 - self.value if self.higher_is_better else self.value - self.fp32

    def summary(self) -> str:
        return (f"{self.metric} {self.value:.4f} against fp32's {self.fp32:.4f} (tolerance {self.tolerance:g}); "
                f"{self.variant_ms:.2f} ms against fp32's {self.fp32_ms:.2f} ms for {self.timed_on} on the CPU "
                f"provider, {self.speedup:.2f}x")

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "speedup": round(self.speedup, 3), "quality_loss": self.loss}


@dataclass
class VariantResult:
    family: str
    variant: str
    onnx_path: Path
    contract: ModelContract
    gate: Gate
    checkpoint: dict


def variant_file(variant: str) -> str:
    return ONNX_FILE if variant == "fp32" else f"model.{variant}.onnx"


def _calibration_reader(feeds: list[dict[str, np.ndarray]]):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(feeds)

        def get_next(self):
            return next(self.feeds, None)

    return Reader()


def _int8(family: Family, source: Path, target: Path, input_names: list[str], calibration: list[tuple],
          exclude: list[str] = ()) -> str:
    feeds = [{n: t.numpy() for n, t in zip(input_names, example)} for example in calibration]
    return quantize_int8(source, target, feeds, family.int8_ops, family.int8_method, exclude)


def quantizable_nodes(source: Path, ops) -> list[str]:
    """The nodes of ``source`` that int8 quantization would change (``ops``), in graph order."""
    import onnx

    return [node.name for node in onnx.load(str(source), load_external_data=False).graph.node
            if node.op_type in ops and node.name]


def quantize_int8(source: Path, target: Path, calibration: list[dict[str, np.ndarray]], ops=("Conv", "MatMul", "Gemm"),
                  method: str = "static", exclude: list[str] = ()) -> str:
    """ONNX Runtime's int8 quantization of ``source`` into ``target`` after ``quant_pre_process``:
    static (QDQ, activation ranges from the calibration feeds) or dynamic; the ``exclude`` nodes
    stay fp32 (static); -> what was done."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        ops = list(ops)
        if method == "dynamic":
            quantize_dynamic(str(prepared), str(target), op_types_to_quantize=ops, weight_type=QuantType.QInt8,
                             per_channel=False)
            return f"dynamic int8 ({', '.join(ops)})"
        quantize_static(str(prepared), str(target), _calibration_reader(calibration),
                        quant_format=QuantFormat.QDQ, op_types_to_quantize=ops, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=list(exclude))
        kept = f"; fp32 kept for {', '.join(exclude)} (the most sensitive)" if exclude else ""
        return (f"static int8, QDQ, per-channel weights ({', '.join(ops)}; {len(calibration)} calibration "
                f"batches{kept})")


def _fp16(family: Family, source: Path, target: Path) -> str:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True,
                                     op_block_list=list(family.fp16_keep_fp32) or None)
    onnx.save_model(proto, str(target))
    kept = f"; kept fp32: {', '.join(family.fp16_keep_fp32)}" if family.fp16_keep_fp32 else ""
    return f"fp16 weights and compute, fp32 inputs/outputs{kept}"


def _with_contract(path: Path, contract: ModelContract, extra_meta: dict[str, str]) -> None:
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    meta.update({CONTRACT_KEY: contract.to_json(), **extra_meta})
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save_model(proto, str(path))


def _median_ms(run, feeds: list[dict[str, np.ndarray]]) -> float:
    for f in feeds:
        run(f)  # warm-up
    times = []
    for _ in range(TIMING_REPEATS):
        started = time.perf_counter()
        for f in feeds:
            run(f)
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def export_variant(family: Family, ckpt_dir: Path, variant: str, data_path: Path | None = None) -> VariantResult:
    """Builds ``model.<variant>.onnx`` next to the fp32 file and gates it; raises VariantRefused
    (and leaves no file) when it fails."""
    from common.runtime import OnnxSession

    if variant not in VARIANTS[1:]:
        raise ValueError(f"variant {variant!r}: choose {', '.join(VARIANTS[1:])} (fp32 is the plain export)")
    source = ckpt_dir / ONNX_FILE
    if not source.exists():
        raise FileNotFoundError(f"{source} is missing: export the fp32 model first (python -m export {family.name})")
    model, cfg, checkpoint = load_checkpoint(family, ckpt_dir)
    spec = family.export_spec(model, cfg, checkpoint)
    train_cfg = TrainConfig(**checkpoint["train_config"])
    data = family.load_data(cfg, train_cfg, data_path, train_cfg.seed)
    base = OnnxSession(source)
    name = f"{base.contract.name}-{variant}"
    contract = dataclasses.replace(base.contract, name=name,
                                   extra={**base.contract.extra, "variant": variant, "variant_of": base.contract.name})
    target = ckpt_dir / variant_file(variant)
    timing = [{n: t.numpy() for n, t in zip(spec.input_names, example)} for example in spec.parity_inputs]
    metric = family.primary_metric
    result: VariantResult | None = None

    def attempt(tmp: Path, exclude: list[str], graph: Path = source) -> Gate:
        """Builds the variant of ``graph`` into ``tmp`` (int8: with ``exclude`` kept fp32) and
        measures its gate against the fp32 model's figure."""
        if variant == "int8":
            method = _int8(family, graph, tmp, spec.input_names, calibration, exclude)
        else:
            method = _fp16(family, source, tmp)
        _with_contract(tmp, contract, {"variant": variant})
        session = OnnxSession(tmp)
        # Each figure through the family's own held-out evaluation, on ONNX Runtime.
        value = family.evaluate(family.graph_model(session.run, cfg), family.gate_data(data))[metric]
        return Gate(variant, metric, fp32_figure, value, family.variant_tolerance, family.higher_is_better,
                    fp32_ms, _median_ms(session.run, timing), method)

    def write(tmp: Path) -> None:
        nonlocal result
        gate = attempt(tmp, [])
        if variant == "int8" and family.int8_method == "static" and gate.loss > gate.tolerance:
            # Fine-tuned weights first (when the family has a recipe), then, where still over, the
            # most sensitive layers of the better graph kept fp32.
            graph, note = source, ""
            tuned_graph = tmp.with_name(tmp.name + ".qat-fp32.onnx")
            try:
                if family.int8_finetune_steps:
                    tuned, tuned_note = quantization_aware(tmp, gate, tuned_graph)
                    if tuned.loss < gate.loss:
                        gate, graph, note = tuned, tuned_graph, tuned_note
                if gate.loss > gate.tolerance or gate.speedup <= 1.0:
                    gate = keep_sensitive_layers_fp32(tmp, gate, graph, note)
            finally:
                tuned_graph.unlink(missing_ok=True)
        if gate.loss > gate.tolerance:
            gate.reason = (f"{metric} {gate.value:.4f} against fp32's {gate.fp32:.4f}: worse by {gate.loss:.4f}, "
                           f"more than the tolerance {gate.tolerance:g}")
        elif variant == "int8" and gate.speedup <= 1.0:
            gate.reason = (f"slower than fp32 on this CPU ({gate.variant_ms:.2f} ms against {gate.fp32_ms:.2f} ms "
                           f"for the export inputs)")
        if gate.reason:
            raise VariantRefused(f"refused: {gate.reason}; nothing was written ({gate.summary()}; {gate.method})", gate)
        gate.passed = True
        gate.reason = "passed" + (" (fp16 is for GPUs: a CPU runs it through casts, so no speed gate)"
                                  if variant == "fp16" else "")
        result = VariantResult(family.name, variant, target, contract, gate, checkpoint)

    def quantization_aware(tmp: Path, whole: Gate, tuned_graph: Path) -> tuple[Gate, str]:
        """The whole graph int8 again, from weights fine-tuned with the rounding simulated
        (export/qat.py), exported through the one export routine to ``tuned_graph``.
        -> (its gate, what the fine-tuning adds to a method's description)."""
        from export.onnx_export import export_module
        from export.qat import finetune_for_int8

        tuned = finetune_for_int8(family, model, data, family.int8_finetune_steps)
        export_module(family.export_spec(tuned, cfg, checkpoint), base.contract, {}, tuned_graph)
        gate = attempt(tmp, [], tuned_graph)
        note = (f"; weights fine-tuned {family.int8_finetune_steps} steps with int8 rounding simulated "
                f"(quantized as trained they lost {whole.loss:.3f})")
        gate.method += note
        log.info("%s int8 after quantization-aware fine-tuning: %s", name, gate.summary())
        return gate, note

    def keep_sensitive_layers_fp32(tmp: Path, whole: Gate, graph: Path, note: str) -> Gate:
        """Each layer of ``graph`` on its own (it alone quantized), then the most sensitive kept
        fp32, one more at a time, until the figure is within tolerance, while int8 is still faster
        (the default denoiser: 0.72 dB lost quantized whole; its last two decoder convolutions
        alone cost 0.43 and 0.19 dB). -> the gate of the last graph built into ``tmp``."""
        nodes = quantizable_nodes(graph, family.int8_ops)
        alone = {node: attempt(tmp, [n for n in nodes if n != node], graph).loss for node in nodes}
        log.info("%s int8: each layer's loss alone: %s", name,
                 ", ".join(f"{n} {loss:.3f}" for n, loss in sorted(alone.items(), key=lambda kv: -kv[1])))
        kept: list[str] = []
        gate = whole
        for node in sorted(nodes, key=lambda n: -alone[n])[: max(1, len(nodes) // 2)]:
            kept.append(node)
            gate = attempt(tmp, kept, graph)
            gate.method += note
            if gate.loss <= gate.tolerance or gate.speedup <= 1.0:
                break
        if gate.loss > gate.tolerance:  # no better: leave the whole graph's figures in the refusal
            return dataclasses.replace(gate, method=f"{gate.method}; still over the tolerance")
        return gate

    calibration = family.calibration_inputs(data, cfg) if variant == "int8" else []
    fp32_figure = family.evaluate(family.graph_model(base.run, cfg), family.gate_data(data))[metric]
    fp32_ms = _median_ms(base.run, timing)

    atomic_write(target, write)
    assert result is not None
    log.info("%s: %s; %s", name, result.gate.reason, result.gate.summary())
    return result


def save_variant_to_store(result: VariantResult, family: Family, ckpt_dir: Path) -> str:
    """The variant as its own model, ``<name>-<variant>``, with its gate in the metadata."""
    from export.onnx_export import store_files, store_metadata

    metadata = {**store_metadata(family, result.checkpoint, result.contract, None),
                "variant": result.variant, "variant_of": result.contract.extra["variant_of"],
                "gate": json.loads(json.dumps(result.gate.as_dict()))}
    return store_files(result.contract.name, family, metadata, result.onnx_path, ckpt_dir, variant=result.variant)
