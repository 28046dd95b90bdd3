"""Service-level objectives of a load test: per-API thresholds (p99 latency, error rate, minimum
throughput) in the ``[tool.suite.slo."<request name>"]`` tables of a TOML profile
(loadtest/profile.toml, which also holds locust's own settings under ``[tool.locust]``), checked
against locust's statistics when a run ends. The locustfile makes a run exit non-zero when one is
missed; a request name without a table has no objective, ``Aggregated`` is the whole run."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Objective:
    name: str  # locust's request name ("/classify", "/v1/completions stream", "Aggregated")
    p99_ms: float | None = None
    max_error_rate: float | None = None  # failures / requests
    min_rps: float | None = None  # requests per second over the run


@dataclass(frozen=True)
class Measured:
    name: str
    requests: int
    failures: int
    p99_ms: float
    rps: float

    @property
    def error_rate(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


def load_objectives(path: str | Path) -> list[Objective]:
    tables = tomllib.loads(Path(path).read_text()).get("tool", {}).get("suite", {}).get("slo", {})
    known = {"p99_ms", "max_error_rate", "min_rps"}
    objectives = []
    for name, table in tables.items():
        unknown = set(table) - known
        if unknown:
            raise ValueError(f"{path}: slo {name!r}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        objectives.append(Objective(name, **{k: float(v) for k, v in table.items()}))
    return objectives


def measured_from_locust(stats) -> dict[str, Measured]:
    """Locust's RequestStats -> one Measured per request name (methods summed) and Aggregated."""
    by_name: dict[str, Measured] = {}
    for entry in list(stats.entries.values()) + [stats.total]:
        name = entry.name
        requests, failures = entry.num_requests, entry.num_failures
        by_name[name] = Measured(name, requests, failures, float(entry.get_response_time_percentile(0.99) or 0),
                                 float(entry.total_rps))
    return by_name


def violations(objectives: list[Objective], measured: dict[str, Measured]) -> list[str]:
    """Each missed objective as one line naming the API, the figure and the threshold."""
    missed = []
    for objective in objectives:
        m = measured.get(objective.name)
        if m is None or m.requests == 0:
            missed.append(f"{objective.name}: no requests")
            continue
        if objective.p99_ms is not None and m.p99_ms > objective.p99_ms:
            missed.append(f"{objective.name}: p99 {m.p99_ms:.0f} ms > {objective.p99_ms:.0f} ms")
        if objective.max_error_rate is not None and m.error_rate > objective.max_error_rate:
            missed.append(f"{objective.name}: error rate {m.error_rate:.2%} > {objective.max_error_rate:.2%}")
        if objective.min_rps is not None and m.rps < objective.min_rps:
            missed.append(f"{objective.name}: {m.rps:.1f} req/s < {objective.min_rps:.1f} req/s")
    return missed


def table(objectives: list[Objective], measured: dict[str, Measured]) -> str:
    lines = [f"{'API':<26} {'requests':>8} {'error rate':>14} {'p99 ms':>14} {'req/s':>14}   (measured / objective)"]
    for o in objectives:
        m = measured.get(o.name) or Measured(o.name, 0, 0, 0.0, 0.0)

        def pair(value: str, limit: float | None, fmt: str) -> str:
            return f"{value} / {format(limit, fmt) if limit is not None else '-'}"

        lines.append(f"{o.name:<26} {m.requests:>8} {pair(f'{m.error_rate:.1%}', o.max_error_rate, '.1%'):>14} "
                     f"{pair(f'{m.p99_ms:.0f}', o.p99_ms, '.0f'):>14} {pair(f'{m.rps:.1f}', o.min_rps, '.1f'):>14}")
    return "\n".join(lines)
