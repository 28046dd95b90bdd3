"""python -m export <family|all> [--build-missing] [--profile standard|quick|benchmark] [--name NAME] [--data PATH] [--no-store]"""

from __future__ import annotations

import argparse
import logging
import os
import time
import sys
from pathlib import Path

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


def main(argv: list[str] | None = None) -> int:
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
    args = parser.parse_args(argv)
    if args.name and args.family == "all":
        parser.error("--name names one model: give a family, not all")
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from export.onnx_export import export_onnx, save_to_store
    from training.__main__ import families_with, model_name, run

    default_profile = "standard" if args.profile == "benchmark" else args.profile
    for family in families_with(args.family, args.profile):
        family_name = family.name
        name = model_name(family, args.profile, args.name)
        if args.build_missing:
            if in_store(name, family.graph_version):
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
        result = export_onnx(family, family_dir(name))
        line = f"[{name}] {result.onnx_path} parity max abs diff {result.parity_max_abs_diff:.2e}"
        if not args.no_store:
            line += f", stored as {save_to_store(result, family, family_dir(name))}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
