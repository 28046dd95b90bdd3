"""python -m training <family|all> [--profile quick|standard] [--data PATH] [--<field> VALUE ...]"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from training.config import TrainConfig, add_dataclass_arguments, build, overrides_from_args
from training.registry import FAMILIES, get


def run(family_name: str, profile: str = "standard", data: Path | None = None, train_overrides=None,
        model_overrides=None, out_dir: Path | None = None, progress: bool = True) -> dict:
    from training.loop import train

    family = get(family_name)
    layers = family.profiles[profile]
    train_cfg = build(TrainConfig, layers.get("train", {}), train_overrides or {})
    cfg = build(family.config_cls, layers.get("model", {}), model_overrides or {})
    data_set = family.load_data(cfg, train_cfg, data, train_cfg.seed)
    checkpoint = train(family, cfg, train_cfg, data_set, profile, out_dir=out_dir, progress=progress)
    return checkpoint["metrics"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Model flags depend on the family, so find the family first (help lists them once it is given).
    family_arg = next((a for a in argv if not a.startswith("-")), None)
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Train a model family and write artifacts/<family>/checkpoint.pt with its metrics. "
                    "The standard profile meets the quality floors; quick trains in seconds for tests.")
    parser.add_argument("family", choices=[*FAMILIES, "all"], help="which model family to train")
    parser.add_argument("--profile", choices=["quick", "standard"], default="standard")
    parser.add_argument("--data", type=Path, default=None,
                        help="train on this data instead of the bundled default (see README for layouts)")
    parser.add_argument("--out", type=Path, default=None, help="checkpoint folder (default artifacts/<family>)")
    add_dataclass_arguments(parser, TrainConfig, "training (any family)")
    if family_arg in FAMILIES:
        cls = FAMILIES[family_arg].config_cls
        add_dataclass_arguments(parser, cls, f"model: {cls.__name__}")
    else:
        parser.epilog = "Model flags are listed by `python -m training <family> --help`."
    args = parser.parse_args(argv)

    names = list(FAMILIES) if args.family == "all" else [args.family]
    below_floor = []
    for name in names:
        family = get(name)
        model_overrides = overrides_from_args(args, family.config_cls)
        metrics = run(name, args.profile, args.data, overrides_from_args(args, TrainConfig), model_overrides, args.out)
        value = metrics[family.primary_metric]
        meets = value >= family.floor if family.higher_is_better else value <= family.floor
        verdict = "meets" if meets else "BELOW"
        print(f"[{name}] {family.primary_metric} = {value:.4f} ({verdict} the standard floor "
              f"{'>=' if family.higher_is_better else '<='} {family.floor})")
        print(json.dumps({"family": name, "profile": args.profile, **metrics}))
        if args.profile == "standard" and not meets:
            below_floor.append(name)
    if below_floor:
        print(f"below the quality floor: {', '.join(below_floor)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
