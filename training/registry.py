"""Family name -> its pieces. Training, export, tests and the load test loop over this; adding a
family is one module plus one line here. Order matters: a family comes after those it requires."""

from __future__ import annotations

from training.families.classify import ClassifyFamily
from training.families.denoise import DenoiseFamily
from training.families.generate import GenerateFamily
from training.families.sample import SampleFamily
from training.families.segment import SegmentFamily
from training.family import Family

FAMILIES: dict[str, Family] = {f.name: f for f in (ClassifyFamily(), SegmentFamily(), GenerateFamily(),
                                                   DenoiseFamily(), SampleFamily())}


def get(name: str) -> Family:
    if name not in FAMILIES:
        raise KeyError(f"unknown family {name!r}; choose from {', '.join(FAMILIES)}")
    return FAMILIES[name]
