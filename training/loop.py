"""The one training loop: seeding, LR schedule, progress bar, periodic evaluation, best-state
tracking with early stopping, metrics log, atomic checkpoint. Families supply the step."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from training.artifacts import CHECKPOINT_FILE, atomic_write, family_dir
from training.family import Data, Family


def _schedule(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _improved(family: Family, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value > best if family.higher_is_better else value < best


def train(family: Family, cfg, train_cfg, data: Data, profile: str, out_dir: Path | None = None,
          progress: bool = True) -> dict:
    """Trains ``family`` and writes ``checkpoint.pt`` (+ ``metrics.jsonl``); returns the checkpoint dict."""
    out_dir = out_dir or family_dir(family.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(train_cfg.seed)
    if train_cfg.threads:
        torch.set_num_threads(train_cfg.threads)

    model = family.build(cfg)
    optimizers = family.optimizers(model, train_cfg)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: _schedule(s, train_cfg.warmup_steps, train_cfg.steps))
                  for o in optimizers.values()]

    log_path = out_dir / "metrics.jsonl"
    log_lines: list[str] = []
    best_metrics: dict[str, float] | None = None
    best_state = None
    best_step = 0
    evals_without_gain = 0
    started = time.monotonic()
    bar = tqdm(range(train_cfg.steps), desc=f"train {family.name}", disable=not progress, unit="step",
               dynamic_ncols=True)
    running: dict[str, float] = {}
    for step in bar:
        model.train()
        losses = family.train_step(model, next(data.train_batches), optimizers, train_cfg)
        for s in schedulers:
            s.step()
        running = {k: 0.9 * running.get(k, v) + 0.1 * v for k, v in losses.items()}
        bar.set_postfix({k: f"{v:.4f}" for k, v in running.items()}, refresh=False)

        last = step + 1 == train_cfg.steps
        if (step + 1) % train_cfg.eval_every == 0 or last:
            model.eval()
            metrics = family.evaluate(model, data)
            log_lines.append(json.dumps({"step": step + 1, **running, **metrics}))
            bar.write(f"[{family.name}] step {step + 1}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            if _improved(family, metrics[family.primary_metric],
                         None if best_metrics is None else best_metrics[family.primary_metric]):
                best_metrics, best_step, evals_without_gain = metrics, step + 1, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                evals_without_gain += 1
                if train_cfg.patience and evals_without_gain >= train_cfg.patience:
                    bar.write(f"[{family.name}] no gain in {evals_without_gain} evaluations: stopping early")
                    break
    bar.close()
    assert best_metrics is not None and best_state is not None
    atomic_write(log_path, lambda p: p.write_text("\n".join(log_lines) + "\n"))

    checkpoint = {
        "family": family.name,
        "profile": profile,
        "model_config": dataclasses.asdict(cfg),
        "train_config": dataclasses.asdict(train_cfg),
        "state_dict": best_state,
        "metrics": {**best_metrics, "best_step": best_step, "train_seconds": round(time.monotonic() - started, 1)},
        "heldout_examples": family.heldout_examples(data),
        "data": {"fingerprint": data.fingerprint, "description": data.description, **data.meta},
    }
    model.load_state_dict(best_state)
    family.save_extra(model.eval(), data, out_dir)
    atomic_write(out_dir / CHECKPOINT_FILE, lambda p: torch.save(checkpoint, p))
    return checkpoint


def load_checkpoint(family: Family, ckpt_dir: Path | None = None):
    """Rebuilds the trained model from the checkpoint alone (its saved config, not today's defaults)."""
    ckpt_dir = ckpt_dir or family_dir(family.name)
    path = ckpt_dir / CHECKPOINT_FILE
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: run `python -m training {family.name}` first")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    cfg = family.config_cls(**checkpoint["model_config"])
    model = family.build(cfg)
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    return model, cfg, checkpoint
