"""python -m export <family|all> [--variant fp32|int8|fp16|all] [--build-missing] [--profile standard|quick|benchmark] [--name NAME] [--data PATH] [--no-store]
python -m export import {onnx MODEL.onnx --spec SPEC.toml | huggingface FOLDER | tensor MODEL.onnx} [--name NAME] (export/imports.py)"""

from __future__ import annotations

import argparse
import logging
import os
import time
import sys
from pathlib import Path

from contract import ONNX_FILE
from training.artifacts import CHECKPOINT_FILE, REPO_ROOT, family_dir

# The model store lives with the project unless told otherwise, never in the user's home.
os.environ.setdefault("BENTOML_HOME", str(REPO_ROOT / ".bentoml"))
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")


def in_store(name: str, graph_version: int = 1) -> bool:
    """The store's newest version of ``name`` exists and has the family's current graph interface."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        stored = bentoml.models.get(name)
    except NotFound:
        return False
    return stored.info.metadata.get("graph_version", 1) == graph_version


def resolve_variant_data(family, args) -> Path | None:
    """The data a variant's gate evaluates on: the benchmark model's own, the packaged data otherwise."""
    if args.profile != "benchmark":
        return args.data
    from training.__main__ import resolve_data

    return resolve_data(family, args.profile, args.data)


def main(argv: list[str] | None = None) -> int:
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
    args = parser.parse_args(argv)
    if args.name and args.family == "all":
        parser.error("--name names one model: give a family, not all")
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from export.onnx_export import export_onnx, save_to_store
    from export.variants import VARIANTS, VariantRefused, export_variant, save_variant_to_store
    from training.__main__ import families_with, model_name, run

    default_profile = "standard" if args.profile == "benchmark" else args.profile
    wanted = list(VARIANTS) if args.variant == "all" else [args.variant]
    for family in families_with(args.family, args.profile):
        family_name = family.name
        name = model_name(family, args.profile, args.name)
        stored_names = {v: name if v == "fp32" else f"{name}-{v}" for v in wanted}
        todo = wanted
        if args.build_missing:
            todo = [v for v in wanted if not in_store(stored_names[v], family.graph_version)]
            if not todo:
                print(f"[{name}] in the model store: reused")
                continue
            if not (family_dir(name) / CHECKPOINT_FILE).exists():
                for needed in family.requires:  # the GAN's judge is the default classifier
                    if not (family_dir(needed) / CHECKPOINT_FILE).exists():
                        run(needed, default_profile)
                print(f"[{name}] no checkpoint: training ({args.profile} profile)")
                started = time.monotonic()
                run(family_name, args.profile, args.data, name=name)
                print(f"[{name}] trained in {(time.monotonic() - started) / 60:.1f} min")
        if "fp32" in todo or not (family_dir(name) / ONNX_FILE).exists():
            result = export_onnx(family, family_dir(name))  # every variant is made from this graph
            line = f"[{name}] {result.onnx_path} parity max abs diff {result.parity_max_abs_diff:.2e}"
            if "fp32" in todo and not args.no_store:
                line += f", stored as {save_to_store(result, family, family_dir(name))}"
            print(line)
        for variant in (v for v in todo if v != "fp32"):
            try:
                made = export_variant(family, family_dir(name), variant, resolve_variant_data(family, args))
            except VariantRefused as refused:
                print(f"[{stored_names[variant]}] {refused}")
                continue
            line = (f"[{stored_names[variant]}] {made.onnx_path}: {made.gate.method}; {made.gate.reason}: "
                    f"{made.gate.summary()}")
            if not args.no_store:
                line += f", stored as {save_variant_to_store(made, family, family_dir(name))}"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
