"""python -m export <family|all> [--variant fp32|int8|fp16|all] [--build-missing] [--profile standard|quick|benchmark] [--name NAME] [--data PATH] [--no-store]
python -m export import {onnx MODEL.onnx --spec SPEC.toml | huggingface FOLDER | tensor MODEL.onnx} [--name NAME] (export/imports.py)"""

from __future__ import annotations

import argparse
import os
import time
import sys
from pathlib import Path

from contract import ONNX_FILE
from training.artifacts import CHECKPOINT_FILE, REPO_ROOT, family_dir


def in_store(name: str, graph_version: int = 1) -> bool:
    """The store's newest version of ``name`` exists and has the family's current graph interface."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        stored = bentoml.models.get(name)
    except NotFound:
        return False
    return stored.info.metadata.get("graph_version", 1) == graph_version


def stored_headline(name: str) -> tuple[str | None, float | None]:
    """A stored model's headline figure: its family's primary metric (a variant's: its gate's)."""
    import bentoml

    try:
        metadata = bentoml.models.get(name).info.metadata
    except Exception:  # noqa: BLE001 - the summary shows "-"
        return None, None
    if metadata.get("gate"):
        return metadata["gate"].get("metric"), metadata["gate"].get("value")
    metric = metadata.get("primary_metric")
    return metric, metadata.get("metrics", {}).get(metric)


def resolve_variant_data(family, args) -> Path | None:
    """The data a variant's gate evaluates on: the benchmark model's own, the packaged data otherwise."""
    if args.profile != "benchmark":
        return args.data
    from training.__main__ import resolve_data

    return resolve_data(family, args.profile, args.data)


def main(argv: list[str] | None = None) -> int:
    # The model store lives with the project unless told otherwise, never in the user's home (set
    # here, before anything imports bentoml, not at import: importing this module changes nothing).
    os.environ.setdefault("BENTOML_HOME", str(REPO_ROOT / ".bentoml"))
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["import"]:  # the user's own models (export/imports.py)
        from export.imports import main as import_main

        return import_main(argv[1:])
    from training.registry import FAMILIES

    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Export trained checkpoints to single-file ONNX (contract in metadata_props), check ONNX "
                    "Runtime against PyTorch (max abs diff <= 1e-4) and save a new version to the BentoML "
                    f"model store at $BENTOML_HOME (now {os.environ['BENTOML_HOME']}).")
    parser.add_argument("family", choices=[*FAMILIES, "all"])
    parser.add_argument("--build-missing", action="store_true",
                        help="only families with no model in the store; train those without a checkpoint first")
    parser.add_argument("--profile", choices=["quick", "standard", "benchmark"], default="standard",
                        help="which model: the family's default (quick or standard training, by --build-missing) or "
                             "its benchmark model, stored under its own name")
    parser.add_argument("--data", type=Path, default=None,
                        help="with --build-missing --profile benchmark: the benchmark data folder (../shared/data)")
    parser.add_argument("--name", default=None,
                        help="the model trained with `python -m training <family> --name NAME` (artifacts/NAME)")
    parser.add_argument("--no-store", action="store_true", help="write the .onnx file only")
    parser.add_argument("--variant", choices=["fp32", "int8", "fp16", "all"], default="fp32",
                        help="fp32: the plain export; int8 (CPU) and fp16 (GPU): built from it, each behind its gate "
                             "(quality within the family's tolerance of fp32, int8 faster than fp32 here) and stored "
                             "as <name>-<variant>; all: the three")
    parser.add_argument("--verbose", action="store_true",
                        help="everything on the console (the exporters' messages, warnings, each evaluation); by "
                             "default the console shows a bar per stage and a summary, the rest goes to "
                             "$SUITE_ARTIFACTS/logs/models-<UTC time>.log")
    args = parser.parse_args(argv)
    if args.name and args.family == "all":
        parser.error("--name names one model: give a family, not all")
    from export.console import Console

    # The console shows a bar per stage and the summary; the rest goes to the log (issue 28).
    console = Console(verbose=args.verbose)
    console.start(f"python -m export {args.family}" + (" --build-missing" if args.build_missing else "")
                  + f": {args.profile} profile")
    try:
        with console.quiet():
            build(args, console)
    except Exception as error:  # the stage's bar has said which one failed
        console.failed(error)
        return 1
    except KeyboardInterrupt as interrupted:
        console.failed(interrupted)
        return 130
    console.summary()
    return 0


def build(args, console) -> None:
    """Every stage of the command's models, each on the console as a bar (export/console.py)."""
    from export.console import headline
    from export.onnx_export import export_onnx, save_to_store
    from export.variants import VARIANTS, VariantRefused, export_variant, save_variant_to_store
    from training.__main__ import families_with, model_name, run
    from training.registry import FAMILIES, get

    default_profile = "standard" if args.profile == "benchmark" else args.profile
    wanted = list(VARIANTS) if args.variant == "all" else [args.variant]
    chosen = families_with(args.family, args.profile)
    for skipped in sorted(set(FAMILIES if args.family == "all" else [args.family]) - {f.name for f in chosen}):
        console.row(skipped).stages["train"] = f"no {args.profile} profile"
    for family in chosen:
        family_name = family.name
        name = model_name(family, args.profile, args.name)
        stored_names = {v: name if v == "fp32" else f"{name}-{v}" for v in wanted}
        todo = wanted
        if args.build_missing:
            todo = [v for v in wanted if not in_store(stored_names[v], family.graph_version)]
            for reused in (stored_names[v] for v in wanted if v not in todo):
                print(f"[{reused}] in the model store: reused")
                console.row(reused).stages["train"] = "in store"
                console.metric(reused, *stored_headline(reused))
            if not todo:
                continue
            if not (family_dir(name) / CHECKPOINT_FILE).exists():
                for needed in family.requires:  # the GAN's judge is the default classifier
                    if not (family_dir(needed) / CHECKPOINT_FILE).exists():
                        metric = get(needed).primary_metric
                        with console.stage(needed, "train") as stage:
                            metrics = run(needed, default_profile, progress=stage.bar)
                            stage.done(headline(metric, metrics.get(metric)))
                        console.metric(needed, metric, metrics.get(metric))
                print(f"[{name}] no checkpoint: training ({args.profile} profile)")
                started = time.monotonic()
                with console.stage(name, "train") as stage:
                    metrics = run(family_name, args.profile, args.data, name=name, progress=stage.bar)
                    stage.done(headline(family.primary_metric, metrics.get(family.primary_metric)))
                print(f"[{name}] trained in {(time.monotonic() - started) / 60:.1f} min")
        if "fp32" in todo or not (family_dir(name) / ONNX_FILE).exists():
            store = "fp32" in todo and not args.no_store
            with console.stage(name, "export", total=2 if store else 1) as stage:
                result = export_onnx(family, family_dir(name))  # every variant is made from this graph
                line = f"[{name}] {result.onnx_path} parity max abs diff {result.parity_max_abs_diff:.2e}"
                stage.advance(f"parity {result.parity_max_abs_diff:.1e}")
                if store:
                    tag = save_to_store(result, family, family_dir(name))
                    line += f", stored as {tag}"
                    stage.advance(f"parity {result.parity_max_abs_diff:.1e}, stored as {tag}")
                print(line)
            console.metric(name, family.primary_metric, result.checkpoint["metrics"].get(family.primary_metric))
        for variant in (v for v in todo if v != "fp32"):
            stored = stored_names[variant]
            with console.stage(stored, variant, total=2 if not args.no_store else 1) as stage:
                try:
                    made = export_variant(family, family_dir(name), variant, resolve_variant_data(family, args))
                except VariantRefused as refused:
                    print(f"[{stored}] {refused}")
                    stage.done("refused (the log says why)")
                    console.metric(stored, refused.gate.metric, refused.gate.value,
                                   f"refused; {refused.gate.speedup:.2f}x fp32's speed")
                    continue
                line = (f"[{stored}] {made.onnx_path}: {made.gate.method}; {made.gate.reason}: "
                        f"{made.gate.summary()}")
                stage.advance(f"passed, {made.gate.speedup:.2f}x fp32's speed")
                if not args.no_store:
                    tag = save_variant_to_store(made, family, family_dir(name))
                    line += f", stored as {tag}"
                    stage.advance(f"passed, {made.gate.speedup:.2f}x fp32's speed, stored as {tag}")
                print(line)
            console.metric(stored, made.gate.metric, made.gate.value, f"{made.gate.speedup:.2f}x fp32's speed")


if __name__ == "__main__":
    sys.exit(main())
