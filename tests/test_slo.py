"""The load tests' service-level objectives (loadtest/slo.py) without a server: reading the
profile, and each kind of miss named with its figure and threshold."""

from __future__ import annotations

import pytest

from loadtest.slo import Measured, Objective, load_objectives, table, violations
from tests.conftest import REPO


def test_profile_has_an_objective_for_every_api():
    names = {o.name for o in load_objectives(REPO / "loadtest/profile.toml")}
    assert names >= {"/classify", "/segment", "/denoise", "/sample", "/generate", "/v1/completions stream",
                     "Aggregated"}


def test_unknown_keys_are_refused(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[tool.suite.slo."/classify"]\np99 = 5\n')
    with pytest.raises(ValueError, match="p99"):
        load_objectives(path)


def test_each_miss_is_named_with_its_figure():
    objectives = [Objective("/classify", p99_ms=100, max_error_rate=0.01, min_rps=10), Objective("/segment", p99_ms=50)]
    fine = {"/classify": Measured("/classify", 1000, 0, 80.0, 20.0), "/segment": Measured("/segment", 10, 0, 40.0, 1.0)}
    assert violations(objectives, fine) == []
    bad = {"/classify": Measured("/classify", 100, 5, 180.0, 4.0)}
    assert violations(objectives, bad) == ["/classify: p99 180 ms > 100 ms", "/classify: error rate 5.00% > 1.00%",
                                           "/classify: 4.0 req/s < 10.0 req/s", "/segment: no requests"]
    assert "/classify" in table(objectives, bad) and "180 / 100" in table(objectives, bad)
