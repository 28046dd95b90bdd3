"""Typed configuration with command-line overrides (``--key value``, kebab-case everywhere)."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainConfig:
    """Knobs every family shares; a family's profiles override them."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    eval_every: int = 200
    patience: int = 0  # evaluations without improvement before stopping early; 0 = never stop early
    select_by: str = ""  # held-out figure that picks the best state; "" = the family's primary metric
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 = torch's default


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, group_title: str) -> None:
    """Adds ``--field-name`` for every field; defaults stay None so unset flags do not override."""
    group = parser.add_argument_group(group_title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("derived"):  # filled in from the data, not a knob
            continue
        kind = hints[f.name]
        parse = _parse_bool if kind is bool else kind
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        group.add_argument(
            "--" + f.name.replace("_", "-"), dest=f"{cls.__name__}.{f.name}", type=parse, default=None,
            metavar=f.name.upper(),
            help=f"(default: {default}, before profile overrides)",
        )


def overrides_from_args(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    prefix = cls.__name__ + "."
    return {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix) and v is not None}


def build(cls: type, *layers: dict[str, Any]) -> Any:
    """Instantiates ``cls`` from defaults, then each override layer in order (profile, then CLI)."""
    values: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for layer in layers:
        unknown = set(layer) - names
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
        values.update(layer)
    return cls(**values)


def derived(default: Any) -> Any:
    """A config field set from the data at load time (class count, normalisation): saved with the
    checkpoint like any other, but not offered as a command-line flag."""
    return field(default=default, metadata={"derived": True})
