"""python -m training report [family ...] [--out reports/training]

A Markdown report of every trained model under the artifacts folder (the defaults and the
benchmark models): learning curves from ``metrics.jsonl``, the family's figures (denoised crops,
masks over images, generated text, the GAN's grid per class) and the benchmark table beside the
published figures. Needs only the checkpoints: a fresh clone with quick models can run it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from training.artifacts import CHECKPOINT_FILE, REPO_ROOT, artifacts_root, model_name

DEFAULT_OUT = REPO_ROOT / "reports" / "training"


def _curves(rows: list[dict], select_by: str, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    keys = [k for k in rows[0] if k not in ("step", "seconds") and all(isinstance(r.get(k), (int, float)) for r in rows)]
    losses = [k for k in keys if "loss" in k]
    figures = [k for k in keys if k not in losses]
    panels = [(losses, "training loss (running mean)")] if losses else []
    panels += [([k], k) for k in figures]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    # Minutes of training on the x axis where the log has them: what a figure cost to reach.
    timed = all("seconds" in r for r in rows)
    xs = [r["seconds"] / 60 for r in rows] if timed else [r["step"] for r in rows]
    for ax, (names, label) in zip(axes[0], panels):
        for k in names:
            ax.plot(xs, [r[k] for r in rows], marker="o", markersize=3, label=k)
        ax.set_xlabel("training minutes" if timed else "step")
        ax.set_title(label, fontsize=9)
        if k == select_by:
            ax.set_title(label + " (picks the model)", fontsize=9)
        if len(names) > 1:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _save_image(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    pixels = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(path)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def benchmark_table(family, checkpoint: dict | None, name: str) -> list[str]:
    """Markdown rows: the published anchors, then this suite's benchmark model (or why not)."""
    columns = family.benchmark_columns
    lines = [f"| {family.name} | " + " | ".join(columns.values()) + " | training |",
             "| --- |" + " --- |" * (len(columns) + 1)]
    for method, figures in family.anchors.items():
        lines.append(f"| {method} | " + " | ".join(_fmt(figures.get(k, "")) for k in columns) + " | |")
    if checkpoint is None:
        lines.append(f"| **{name}** (this suite) | " + " | ".join("not trained" for _ in columns) + " | |")
    else:
        found = {**checkpoint["metrics"], **checkpoint.get("benchmark", {})}
        minutes = checkpoint["metrics"].get("train_seconds", 0) / 60
        lines.append(f"| **{name}** (this suite) | " + " | ".join(f"**{_fmt(found.get(k, '-'))}**" for k in columns)
                     + f" | {minutes:.1f} min, 2 CPU cores |")
    if family.benchmark_goal:
        lines.append("")
        lines.append(f"Goal: {family.benchmark_goal}")
    return lines


def _trained_models(artifacts: Path) -> dict[str, str]:
    """Every trained model under ``artifacts``: its name (folder) -> its family."""
    import torch

    if not artifacts.is_dir():
        return {}
    # mmap: only the family field is read here; the tensors are loaded once, by load_checkpoint
    return {d.name: torch.load(d / CHECKPOINT_FILE, map_location="cpu", weights_only=False,
                               mmap=True).get("family", d.name)
            for d in sorted(artifacts.iterdir()) if (d / CHECKPOINT_FILE).exists()}


def _model_names(trained: dict[str, str], family, benchmark_name: str | None) -> list[str]:
    """The family's trained models: its default, its benchmark model, then any other trained under
    its own name (``--name classify-alexnet``), by name."""
    first = [n for n in (family.name, benchmark_name) if trained.get(n) == family.name]
    return first + [n for n, f in trained.items() if f == family.name and n not in first]


def write_report(families: list[str] | None = None, out: Path = DEFAULT_OUT, artifacts: Path | None = None) -> Path:
    from training.loop import load_checkpoint
    from training.registry import FAMILIES, get

    artifacts = artifacts or artifacts_root()
    out.mkdir(parents=True, exist_ok=True)
    wanted = families or list(FAMILIES)
    lines = ["# Training report", "",
             f"Every trained model under `{artifacts}`; written by `python -m training report`.", ""]
    benchmark_lines: list[str] = []
    trained = _trained_models(artifacts)
    for family_name in wanted:
        family = get(family_name)
        benchmark_name = model_name(family, "benchmark") if "benchmark" in family.profiles else None
        benchmark_checkpoint = None
        for name in _model_names(trained, family, benchmark_name):
            ckpt_dir = artifacts / name
            model, _, checkpoint = load_checkpoint(family, ckpt_dir)
            if name == benchmark_name:
                benchmark_checkpoint = checkpoint
            lines += [f"## {name}", "",
                      f"{family.task}, {checkpoint['profile']} profile, data: {checkpoint['data']['description']}.", ""]
            metrics = checkpoint["metrics"]
            lines.append("| figure | value |")
            lines.append("| --- | --- |")
            for k, v in {**metrics, **checkpoint.get("benchmark", {})}.items():
                lines.append(f"| {k} | {_fmt(v)} |")
            lines.append("")
            log = ckpt_dir / "metrics.jsonl"
            rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
            if rows:
                select_by = checkpoint["train_config"].get("select_by") or family.primary_metric
                _curves(rows, select_by, f"{name}: evaluations during training", out / f"{name}-curves.png")
                lines += [f"![{name} learning curves]({name}-curves.png)", ""]
            for i, (title, figure) in enumerate(family.report_figures(model, checkpoint, ckpt_dir).items()):
                if isinstance(figure, str):
                    lines += [f"**{title}**", "", "```", figure, "```", ""]
                else:
                    file = f"{name}-figure{i}.png"
                    _save_image(figure, out / file)
                    lines += [f"**{title}**", "", f"![{title}]({file})", ""]
        if "benchmark" in family.profiles:
            benchmark_lines += benchmark_table(family, benchmark_checkpoint, model_name(family, "benchmark")) + [""]
    if benchmark_lines:
        lines += ["## Benchmarks beside the published figures", "", *benchmark_lines]
    report = out / "README.md"
    tmp = report.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(report)
    return report


def main(argv: list[str] | None = None) -> int:
    from training.registry import FAMILIES

    parser = argparse.ArgumentParser(prog="python -m training report", description=__doc__.split("\n\n")[1])
    parser.add_argument("families", nargs="*", metavar="family", help=f"any of {', '.join(FAMILIES)} (default: all)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for README.md and the PNGs")
    args = parser.parse_args(argv)
    unknown = [f for f in args.families if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown family {unknown[0]!r}; choose from {', '.join(FAMILIES)}")
    print(write_report(args.families or None, args.out))
    return 0
