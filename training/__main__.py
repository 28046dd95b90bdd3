"""python -m training <family|all> [--profile quick|standard|benchmark] [--data PATH] [--name NAME] [--resume] [--<field> VALUE ...]
python -m training report [family ...]"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from training.artifacts import REPO_ROOT, model_name
from training.config import TrainConfig, add_dataclass_arguments, build, overrides_from_args

PROFILES = ("quick", "standard", "benchmark")
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"  # the benchmark data sets (never committed here)


def families_with(family_arg: str, profile: str) -> list:
    """The families ``family_arg`` names (one, or every one for "all") that have ``profile``;
    says which are skipped."""
    from training.registry import FAMILIES, get

    chosen = []
    for name in (list(FAMILIES) if family_arg == "all" else [family_arg]):
        family = get(name)
        if profile in family.profiles:
            chosen.append(family)
        else:
            print(f"[{name}] has no {profile} profile: skipped")
    return chosen


def resolve_data(family, profile: str, data: Path | None) -> Path | None:
    """The benchmark profiles name their data set under the shared data folder; ``--data`` may be
    that folder, the data set itself, or anything else in the family's accepted layouts."""
    layers = family.profiles[profile]
    if "data" in layers and layers["data"] is None:
        return None  # a benchmark on the packaged data (the digits): the shared folder plays no part
    subpath = layers.get("data")
    if subpath is None:
        return data
    root = data if data is not None else SHARED_DATA
    if (root / subpath).exists():
        return root / subpath
    if data is not None and data.exists():
        return data
    raise FileNotFoundError(f"the {profile} profile of {family.name} trains on {subpath} under the benchmark data "
                            f"folder; not found under {root} (pass --data)")


def run(family_name: str, profile: str = "standard", data: Path | None = None, train_overrides=None,
        model_overrides=None, out_dir: Path | None = None, progress=True, resume: bool = False,
        stop_after: int = 0, name: str | None = None) -> dict:
    from training.artifacts import family_dir
    from training.loop import train
    from training.registry import get

    family = get(family_name)
    if profile not in family.profiles:
        raise ValueError(f"{family_name} has no {profile!r} profile; it has {', '.join(family.profiles)}")
    layers = family.profiles[profile]
    train_cfg = build(TrainConfig, layers.get("train", {}), train_overrides or {})
    cfg = build(family.config_cls, layers.get("model", {}), model_overrides or {})
    data_set = family.load_data(cfg, train_cfg, resolve_data(family, profile, data), train_cfg.seed)
    name = model_name(family, profile, name)
    checkpoint = train(family, cfg, train_cfg, data_set, profile, out_dir=out_dir or family_dir(name),
                       progress=progress, resume=resume, stop_after=stop_after, name=name)
    if "stopped_at" in checkpoint:
        return checkpoint
    return {**checkpoint["metrics"], **{f"benchmark_{k}": v for k, v in checkpoint["benchmark"].items()}}


def main(argv: list[str] | None = None) -> int:
    from training.registry import FAMILIES

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        from training.report import main as report_main

        return report_main(argv[1:])
    # Model flags depend on the family, so find the family first (help lists them once it is given).
    family_arg = next((a for a in argv if not a.startswith("-")), None)
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Train a model family and write artifacts/<model>/checkpoint.pt with its metrics, TensorBoard "
                    "events and (until it finishes) a resumable train_state.pt. The standard profile meets the "
                    "quality floors; quick trains in seconds for tests; benchmark trains on a public data set "
                    f"(default folder {SHARED_DATA}) under its own model name. "
                    "`python -m training report [family]` writes the Markdown report.")
    parser.add_argument("family", choices=[*FAMILIES, "all"], help="which model family to train")
    parser.add_argument("--profile", choices=PROFILES, default="standard")
    parser.add_argument("--data", type=Path, default=None,
                        help="train on this data instead of the bundled default (layouts: docs/training.md, 'Each stage alone')")
    parser.add_argument("--out", type=Path, default=None, help="checkpoint folder (default artifacts/<model>)")
    parser.add_argument("--name", default=None,
                        help="the model's name (its artifacts/ folder and store name), to keep it beside the default "
                             "one: e.g. classify-alexnet")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted run from its train_state.pt (same configuration)")
    parser.add_argument("--stop-after", type=int, default=0, metavar="STEPS",
                        help="stop after this many steps of this run, keeping the state for --resume")
    add_dataclass_arguments(parser, TrainConfig, "training (any family)")
    if family_arg in FAMILIES:
        cls = FAMILIES[family_arg].config_cls
        add_dataclass_arguments(parser, cls, f"model: {cls.__name__}")
    else:
        parser.epilog = "Model flags are listed by `python -m training <family> --help`."
    args = parser.parse_args(argv)

    if args.name and args.family == "all":
        parser.error("--name names one model: give a family, not all")
    below_floor = []
    for family in families_with(args.family, args.profile):
        name = family.name
        model_overrides = overrides_from_args(args, family.config_cls)
        metrics = run(name, args.profile, args.data, overrides_from_args(args, TrainConfig), model_overrides,
                      args.out, resume=args.resume, stop_after=args.stop_after, name=args.name)
        if "stopped_at" in metrics:
            print(f"[{name}] stopped after step {metrics['stopped_at']}: continue with --resume")
            continue
        value = metrics[family.primary_metric]
        meets = value >= family.floor if family.higher_is_better else value <= family.floor
        if args.profile == "standard":  # the floors are the standard models'; other data, other figures
            verdict = "meets" if meets else "BELOW"
            print(f"[{name}] {family.primary_metric} = {value:.4f} ({verdict} the standard floor "
                  f"{'>=' if family.higher_is_better else '<='} {family.floor})")
        else:
            print(f"[{name}] {family.primary_metric} = {value:.4f}")
        print(json.dumps({"family": name, "model": model_name(family, args.profile, args.name), "profile": args.profile,
                          **metrics}))
        if args.profile == "standard" and not meets:
            below_floor.append(name)
    if below_floor:
        print(f"below the quality floor: {', '.join(below_floor)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
