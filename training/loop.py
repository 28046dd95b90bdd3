"""The one training loop: seeding, LR schedule, progress bar, periodic evaluation, best-state
tracking with early stopping, TensorBoard events, metrics log, resumable training state, atomic
checkpoint. Families supply the step."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from itertools import islice
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from common.files import atomic_write
from training.artifacts import CHECKPOINT_FILE, family_dir
from training.family import Data, Family
from training.threads import ThreadGovernor

STATE_FILE = "train_state.pt"  # everything a resumed run needs; written at every evaluation
TENSORBOARD_DIR = "tensorboard"
LOG_EVERY = 10  # steps between TensorBoard loss points


def _schedule(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _better(family: Family, metric: str, value: float, best: float) -> bool:
    higher = family.higher_is_better if metric == family.primary_metric else metric not in family.lower_is_better
    return value > best if higher else value < best


def _improved(family: Family, metric: str, metrics: dict[str, float], best: dict[str, float] | None) -> bool:
    """Better on the selection metric; on a tie (accuracy saturates at 1.0 early), better on the
    family's tie-break figure, so a later, further-trained state wins."""
    if best is None:
        return True
    if metrics[metric] == best[metric] and family.tie_break:
        return _better(family, family.tie_break, metrics[family.tie_break], best[family.tie_break])
    return _better(family, metric, metrics[metric], best[metric])


class ResumeError(RuntimeError):
    pass


def _tensorboard(out_dir: Path, purge_step: int | None):
    from torch.utils.tensorboard import SummaryWriter

    # purge_step: a resumed run drops the events the interrupted one wrote after its last state.
    return SummaryWriter(log_dir=str(out_dir / TENSORBOARD_DIR), purge_step=purge_step)


def _write_samples(writer, family: Family, model, data: Data, step: int) -> None:
    for tag, value in family.tensorboard_samples(model, data).items():
        if isinstance(value, str):
            writer.add_text(tag, value, step)
        else:
            writer.add_images(tag, value.clamp(0, 1), step)


def train(family: Family, cfg, train_cfg, data: Data, profile: str, out_dir: Path | None = None,
          progress: bool | Callable[..., tqdm] = True, resume: bool = False, stop_after: int = 0,
          name: str | None = None) -> dict:
    """Trains ``family`` and writes ``checkpoint.pt`` (+ ``metrics.jsonl``, TensorBoard events and
    ``train_state.pt``); returns the checkpoint dict. ``resume`` continues from ``train_state.pt``
    exactly where the interrupted run left it (same batches, same random numbers); ``stop_after``
    stops after that many steps of this run, leaving the state to resume from. ``progress``: the
    step bar on stderr, none, or ``progress(steps, **tqdm_options)`` -> the caller's bar (each
    evaluation's line then goes to stdout, which ``python -m export`` sends to its log)."""
    name = name or family.name
    out_dir = out_dir or family_dir(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(train_cfg.seed)
    governor = ThreadGovernor(train_cfg.threads)
    select_by = train_cfg.select_by or family.primary_metric

    model = family.build(cfg)
    optimizers = family.optimizers(model, train_cfg)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: _schedule(s, train_cfg.warmup_steps, train_cfg.steps))
                  for o in optimizers.values()]

    log_lines: list[str] = []
    best_metrics: dict[str, float] | None = None
    best_state = None
    best_step = 0
    evals_without_gain = 0
    running: dict[str, float] = {}
    first_step, spent = 0, 0.0
    state_path = out_dir / STATE_FILE
    if resume:
        if not state_path.exists():
            raise ResumeError(f"--resume: no {STATE_FILE} in {out_dir}")
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        for what, saved, now in (("model config", state["model_config"], dataclasses.asdict(cfg)),
                                 ("training config", state["train_config"], dataclasses.asdict(train_cfg)),
                                 ("data", state["data_fingerprint"], data.fingerprint)):
            if saved != now:
                raise ResumeError(f"--resume: the {what} differs from the interrupted run's ({saved} != {now})")
        model.load_state_dict(state["model"])
        for key, opt in optimizers.items():
            opt.load_state_dict(state["optimizers"][key])
        for sched, saved in zip(schedulers, state["schedulers"]):
            sched.load_state_dict(saved)
        first_step, spent = state["step"], state["seconds"]
        log_lines, running = state["log_lines"], state["running"]
        best_metrics, best_state, best_step = state["best_metrics"], state["best_state"], state["best_step"]
        evals_without_gain = state["evals_without_gain"]
        # The batch streams are seeded generators: replaying them puts them where they were. The
        # global RNG (dropout, flips, GAN latents) is restored after, as it stood at the save.
        for _ in islice(data.train_batches, first_step):
            pass
        torch.set_rng_state(state["torch_rng"])

    def save_state(step: int) -> None:
        state = {"step": step, "seconds": spent + time.monotonic() - started,
                 "model": model.state_dict(), "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                 "schedulers": [s.state_dict() for s in schedulers], "torch_rng": torch.get_rng_state(),
                 "log_lines": log_lines, "running": running, "best_metrics": best_metrics,
                 "best_state": best_state, "best_step": best_step, "evals_without_gain": evals_without_gain,
                 "model_config": dataclasses.asdict(cfg), "train_config": dataclasses.asdict(train_cfg),
                 "data_fingerprint": data.fingerprint}
        atomic_write(state_path, lambda p: torch.save(state, p))

    writer = _tensorboard(out_dir, first_step + 1 if resume else None)
    started = time.monotonic()
    last_steps = range(first_step, train_cfg.steps)
    if stop_after:
        last_steps = range(first_step, min(train_cfg.steps, first_step + stop_after))
    bar_options = dict(desc=f"train {name}", unit="step", dynamic_ncols=True, initial=first_step, total=train_cfg.steps)
    # progress: a bar on stderr (True), none (False), or a caller's bar factory (export/console.py's stages).
    bar = progress(last_steps, **bar_options) if callable(progress) else tqdm(last_steps, disable=not progress,
                                                                            **bar_options)
    finished = True
    step = first_step - 1
    for step in bar:
        governor.poll()
        model.train()
        losses = family.train_step(model, next(data.train_batches), optimizers, train_cfg)
        for s in schedulers:
            s.step()
        running = {k: 0.9 * running.get(k, v) + 0.1 * v for k, v in losses.items()}
        bar.set_postfix({k: f"{v:.4f}" for k, v in running.items()}, refresh=False)
        if (step + 1) % LOG_EVERY == 0:
            for k, v in losses.items():
                writer.add_scalar(f"train/{k}", v, step + 1)
            writer.add_scalar("train/learning_rate", schedulers[0].get_last_lr()[0], step + 1)
            writer.add_scalar("train/threads", governor.threads, step + 1)

        last = step + 1 == train_cfg.steps
        if (step + 1) % train_cfg.eval_every == 0 or last:
            model.eval()
            metrics = family.evaluate(model, data)
            elapsed = spent + time.monotonic() - started
            log_lines.append(json.dumps({"step": step + 1, "seconds": round(elapsed, 1), **running, **metrics}))
            for k, v in metrics.items():
                writer.add_scalar(f"val/{k}", v, step + 1)
            _write_samples(writer, family, model, data, step + 1)
            writer.flush()
            bar.write(f"[{name}] step {step + 1}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            if _improved(family, select_by, metrics, best_metrics):
                best_metrics, best_step, evals_without_gain = metrics, step + 1, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                evals_without_gain += 1
                if train_cfg.patience and evals_without_gain >= train_cfg.patience:
                    bar.write(f"[{name}] no gain in {evals_without_gain} evaluations: stopping early")
                    break
            if not last:
                save_state(step + 1)
    else:
        finished = step + 1 >= train_cfg.steps
    bar.close()
    if not finished:  # stopped by stop_after: keep the exact state, write no checkpoint
        save_state(step + 1)
        writer.close()
        return {"stopped_at": step + 1}
    writer.close()
    assert best_metrics is not None and best_state is not None
    atomic_write(out_dir / "metrics.jsonl", lambda p: p.write_text("\n".join(log_lines) + "\n"))

    model.load_state_dict(best_state)
    model.eval()
    train_seconds = round(spent + time.monotonic() - started, 1)
    checkpoint = {
        "family": family.name,
        "name": name,
        "profile": profile,
        "model_config": dataclasses.asdict(cfg),
        "train_config": dataclasses.asdict(train_cfg),
        "state_dict": best_state,
        "metrics": {**best_metrics, "best_step": best_step, "train_seconds": train_seconds},
        "benchmark": family.benchmark(model, data),
        "thread_changes": governor.changes,
        "heldout_examples": family.heldout_examples(data),
        "data": {"fingerprint": data.fingerprint, "description": data.description, **data.meta},
    }
    family.save_extra(model, data, out_dir)
    atomic_write(out_dir / CHECKPOINT_FILE, lambda p: torch.save(checkpoint, p))
    state_path.unlink(missing_ok=True)  # finished: nothing to resume
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
