"""What every model family supplies to the shared training loop and export routine.

A family overrides small pieces (build, data, loss, evaluation, export inputs, contract); the loop,
the export routine and the serving wrapper are shared. The GAN replaces ``train_step`` only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from contract import ModelContract


@dataclass
class Data:
    """A family's data: an endless stream of training batches plus fixed held-out sets."""

    train_batches: Iterator[Any]
    heldout: Any
    fingerprint: str
    description: str
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-able facts kept in the checkpoint (labels)
    extra: dict[str, Any] = field(default_factory=dict)  # in-memory helpers (a trained tokenizer)


@dataclass
class ExportSpec:
    module: nn.Module  # what gets exported (may wrap the trained model)
    example_inputs: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: Any  # torch.export dynamic shapes, matching example_inputs
    parity_inputs: list[tuple[torch.Tensor, ...]]  # held-out inputs for the ONNX Runtime check
    # Inputs paired with the outputs the graph must give, computed another way (each row of a padded
    # batch run alone); NaN marks values that are not compared (padding).
    reference_checks: list[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]] = field(default_factory=list)


class Family:
    name: str = ""
    task: str = ""
    config_cls: type = object  # model hyper-parameters (a dataclass)
    # profile -> {"train": {...}, "model": {...}}; the benchmark profile also names its model
    # ("name": its store name, beside the default one) and its data under ../shared/data ("data"; None:
    # the packaged data).
    profiles: dict[str, dict[str, Any]] = {}
    primary_metric: str = ""  # the quality figure checked against the floor
    higher_is_better: bool = True  # of the primary metric
    lower_is_better: tuple[str, ...] = ()  # other held-out figures where less is better (for select_by)
    tie_break: str = ""  # the held-out figure that picks between states equal on the selection metric
    floor: float = 0.0  # quality floor of the standard profile
    requires: tuple[str, ...] = ()  # families whose checkpoints this one needs (the GAN's judge)
    # The benchmark table of the report: figure key -> column label; published figures per method
    # (same keys) and the goal, from ../shared/data/README.md and the issue that set it.
    benchmark_columns: dict[str, str] = {}
    anchors: dict[str, dict[str, float]] = {}
    benchmark_goal: str = ""
    # Per-runtime variants (export/variants.py): how int8 is made, which ops stay fp32 in the fp16
    # graph (no fp16 kernel where it is checked), and how far a variant's primary figure may fall
    # below the fp32 graph's (in the metric's own units).
    int8_method: str = "static"  # static (calibrated QDQ) | dynamic
    int8_ops: tuple[str, ...] = ("Conv", "MatMul", "Gemm")
    # Static int8 that misses the tolerance is tried again after this many steps of
    # quantization-aware fine-tuning (export/qat.py) on the family's loss; 0 = never.
    int8_finetune_steps: int = 0
    fp16_keep_fp32: tuple[str, ...] = ()
    variant_tolerance: float = 0.0
    # Bumped when the exported graph's interface changes: `--build-missing` re-exports stored
    # versions of an older graph from their checkpoint.
    graph_version: int = 1

    # --- model and data ---
    def build(self, cfg) -> nn.Module:
        raise NotImplementedError

    def load_data(self, cfg, train_cfg, data_path: Path | None, seed: int) -> Data:
        raise NotImplementedError

    # --- training ---
    def optimizers(self, model: nn.Module, train_cfg) -> dict[str, torch.optim.Optimizer]:
        return {"model": torch.optim.AdamW(model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)}

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        raise NotImplementedError

    def train_step(self, model: nn.Module, batch, optimizers: dict[str, torch.optim.Optimizer],
                   train_cfg) -> dict[str, float]:
        opt = optimizers["model"]
        loss = self.loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if train_cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        opt.step()
        return {"loss": loss.item()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Data) -> dict[str, float]:
        raise NotImplementedError

    def benchmark(self, model: nn.Module, data: Data) -> dict[str, float]:
        """Figures on the benchmark's standard split, measured once on the final model (Set12 PSNR
        at each noise level); the split is never used to pick the model. Empty: the held-out
        evaluation is the benchmark figure."""
        return {}

    def tensorboard_samples(self, model: nn.Module, data: Data) -> dict[str, Any]:
        """What to show at each evaluation: tag -> image batch (N, C, H, W) in [0, 1] or text."""
        return {}

    def report_figures(self, model: nn.Module, checkpoint: dict, ckpt_dir: Path) -> dict[str, Any]:
        """What the report shows of a trained model besides its curves: title -> image array
        (H, W) or (H, W, 3) in [0, 1], or text. Built from packaged data and the checkpoint only."""
        return {}

    # --- variants ---
    def graph_model(self, run, cfg) -> Any:
        """The exported graph (``run``: feeds -> outputs by name) standing in for the PyTorch model
        in ``evaluate``, so a variant's gate is the family's own held-out figure."""
        raise NotImplementedError

    def calibration_inputs(self, data: Data, cfg, batches: int = 8) -> list[tuple[torch.Tensor, ...]]:
        """Graph inputs drawn from the training stream, for static int8's activation ranges."""
        raise NotImplementedError

    def gate_data(self, data: Data) -> Data:
        """The held-out data a variant's gate evaluates on (a family may shorten it)."""
        return data

    # --- artifacts ---
    def save_extra(self, model: nn.Module, data: Data, out_dir: Path) -> None:
        """Writes files the model needs besides its weights (a tokenizer) next to the checkpoint."""

    def extra_files(self) -> list[str]:
        """Names of files from ``save_extra`` that export copies into the model store."""
        return []

    def heldout_examples(self, data: Data) -> list[tuple[torch.Tensor, ...]]:
        """A few held-out model inputs, kept in the checkpoint for export's parity check."""
        raise NotImplementedError

    def export_spec(self, model: nn.Module, cfg, checkpoint: dict) -> ExportSpec:
        raise NotImplementedError

    def contract(self, cfg, checkpoint: dict, ckpt_dir: Path) -> ModelContract:
        raise NotImplementedError
