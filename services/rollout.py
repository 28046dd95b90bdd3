"""Canary and shadow rollouts between two versions or variants of one model.

A rollout names the model clients call (the primary: its routed variant at its serving version)
and a candidate (another served model of the same task and inputs, such as ``classify-int8``, or
another stored version, ``classify:<version>``). Requests that name no version are split:

- ``split`` % are answered by the candidate (a canary);
- ``shadow`` % of the rest are answered by the primary and also run on the candidate in the
  background; the two answers are compared by the task's own measure (top-1 agreement, mIoU, PSNR,
  token agreement) and the candidate's is dropped;
- a request with the header ``x-suite-rollout: candidate`` (or ``primary``) goes where it says.

Promotion is a call, or automatic once ``promote_after`` comparisons are in: the candidate is
promoted when the mean measure reaches ``min_agreement`` (the task's default when not given), and
refused (the rollout stops, the primary keeps every request) when it does not, with the figures.

Across a server's workers: the plans live in ``rollouts.json`` in the model-control folder (written
atomically; every worker re-reads it when it changes) and each worker's comparison tally in
``tally-<pid>.json`` beside it, so a decision counts every worker's comparisons."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from common.files import atomic_write
from common.resources import process_alive
from contract import MODEL_NAME

log = logging.getLogger("services.rollout")

ROLLOUT_HEADER = "x-suite-rollout"
ARMS = ("primary", "candidate")
# The arm a request asked for (the header, or gRPC metadata of the same name), set by the front-end.
requested_arm: contextvars.ContextVar[str | None] = contextvars.ContextVar("requested_arm", default=None)
PSNR_CAP_DB = 100.0  # identical images have an infinite PSNR; capped so means stay finite
MAX_SHADOWS_IN_FLIGHT = 8  # per worker: more shadow runs are skipped (counted), never queued behind clients
WATCH_S = 0.5  # how often a worker re-reads the shared plans and writes its tally
STATES = ("running", "promoted", "refused", "stopped")


@dataclass(frozen=True)
class RolloutPlan:
    model: str  # what clients call
    candidate: str  # "name" (another served model) or "model:version" (another stored version of it)
    split: float = 0.0  # percent of requests answered by the candidate
    shadow: float = 0.0  # percent of the primary's requests also run on the candidate and compared
    promote_after: int = 0  # comparisons before the automatic decision; 0 = decided by a call only
    min_agreement: float | None = None  # in the task's measure; None = the task's default
    state: str = "running"
    verdict: dict | None = None  # the figures the rollout was promoted or refused on
    started_at: float = 0.0  # tallies from before this belong to an earlier rollout

    @property
    def candidate_name(self) -> str:
        return self.candidate.partition(":")[0]

    @property
    def candidate_version(self) -> str | None:
        return self.candidate.partition(":")[2] or None

    @property
    def running(self) -> bool:
        return self.state == "running"

    @classmethod
    def parse(cls, entry: str) -> "RolloutPlan":
        """``model=candidate[;split=10][;shadow=10][;promote_after=200][;min_agreement=0.95]`` (the
        ``rollouts`` setting's entries)."""
        head, *options = [part.strip() for part in entry.split(";")]
        model, eq, candidate = head.partition("=")
        if not eq:
            raise ValueError(f"rollouts: {entry!r} is not model=candidate[;split=..][;shadow=..]"
                             "[;promote_after=..][;min_agreement=..]")
        values: dict[str, Any] = {}
        for option in options:
            key, eq, raw = option.partition("=")
            if not eq or key not in ("split", "shadow", "promote_after", "min_agreement"):
                raise ValueError(f"rollouts: {option!r} in {entry!r}: options are split, shadow, promote_after, "
                                 "min_agreement")
            try:
                values[key] = int(raw) if key == "promote_after" else float(raw)
            except ValueError:
                raise ValueError(f"rollouts: {option!r} in {entry!r} is not a number") from None
        return cls.from_json({"model": model.strip(), "candidate": candidate.strip(), **values})

    @classmethod
    def from_json(cls, data: dict) -> "RolloutPlan":
        """A plan from a JSON object (the admin route's body, the shared file); checked."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown rollout fields {unknown}; known: {sorted(known - {'verdict', 'state'})}")
        plan = cls(**data)
        plan.check()
        return plan

    def check(self) -> None:
        if not isinstance(self.model, str) or not MODEL_NAME.fullmatch(self.model):
            raise ValueError(f"model: {self.model!r} is not a model name")
        if not isinstance(self.candidate, str) or not MODEL_NAME.fullmatch(self.candidate_name):
            raise ValueError(f"candidate: {self.candidate!r} is not a model name or model:version")
        if self.candidate_name == self.model and not self.candidate_version:
            raise ValueError("candidate: the same model needs a version (model:version) to differ from the primary")
        if self.candidate_version and self.candidate_name != self.model:
            raise ValueError("candidate: a version names another stored version of the same model "
                             f"({self.model}:<version>); another model is named without one")
        for name in ("split", "shadow"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
                raise ValueError(f"{name}: a percentage in 0..100, got {value!r}")
        if isinstance(self.promote_after, bool) or not isinstance(self.promote_after, int) or self.promote_after < 0:
            raise ValueError(f"promote_after: a count >= 0, got {self.promote_after!r}")
        if self.min_agreement is not None and (isinstance(self.min_agreement, bool) or
                                               not isinstance(self.min_agreement, (int, float)) or
                                               not math.isfinite(self.min_agreement)):
            raise ValueError(f"min_agreement: a number, got {self.min_agreement!r}")
        if self.promote_after and not self.shadow and not self.split:
            raise ValueError("promote_after needs comparisons: give shadow (percent of requests compared)")
        if self.state not in STATES:
            raise ValueError(f"state: one of {list(STATES)}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Tally:
    """One worker's comparisons for one rollout."""

    candidate: str
    measure: str
    started_at: float
    count: int = 0
    total: float = 0.0
    skipped: int = 0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class Rollouts:
    """One worker's side: which arm a request goes to, the shadow runs, the tallies, and the plans
    shared with the other workers through ``folder`` (None: this process only)."""

    def __init__(self, plans: list[RolloutPlan], folder: Path | None = None, metrics: Any = None,
                 rng: random.Random | None = None):
        self.folder = folder
        self.metrics = metrics
        self.rng = rng or random.Random()
        self.plans: dict[str, RolloutPlan] = {}
        self.tallies: dict[str, Tally] = {}
        self._stamp = 0
        self._dirty = False
        self._in_flight: set[asyncio.Task] = set()
        self._deciding: asyncio.Task | None = None
        self.worker = f"{os.getpid()}-{id(self):x}"  # names this worker's tally file
        self.on_decided: Callable[[RolloutPlan], Any] | None = None  # set by the data plane: acts on a promotion
        configured = {plan.model: dataclasses.replace(plan, started_at=time.time()) for plan in plans}
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            # The first worker of the server writes the configured plans; the others (and a worker
            # replacing a killed one) take what is shared, decisions included.
            self.plans = self._update(lambda plans: None if plans is not None else configured)
        else:
            self.plans = configured

    # ---- the shared plans ----------------------------------------------------------------------------

    @property
    def _path(self) -> Path:
        return self.folder / "rollouts.json"

    def _read(self) -> dict[str, RolloutPlan] | None:
        try:
            data = json.loads(self._path.read_bytes())
        except FileNotFoundError:
            return None
        return {name: RolloutPlan(**plan) for name, plan in data.items()}

    def _update(self, change: Callable[[dict[str, RolloutPlan] | None], dict[str, RolloutPlan] | None]
                ) -> dict[str, RolloutPlan]:
        """Read-modify-write of the shared plans under the server's lock: ``change`` gets them (None
        before the first write) and returns the plans to write, or None to leave them."""
        import fcntl

        with open(self.folder / "rollouts.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            plans = self._read()
            changed = change(plans)
            if changed is not None:
                atomic_write(self._path, json.dumps({n: p.to_json() for n, p in changed.items()}).encode())
                plans = changed
        return plans or {}

    def set(self, plan: RolloutPlan, only_if_running_since: float | None = None) -> bool:
        """Starts, replaces or ends (a state other than running) the rollout of ``plan.model`` in
        every worker. ``only_if_running_since``: only while the shared plan is still the rollout
        started then and running (a decision that another worker may be making at the same time);
        -> whether the plan was written."""
        if plan.running and not plan.started_at:
            plan = dataclasses.replace(plan, started_at=time.time())

        def merge(plans: dict[str, RolloutPlan]) -> bool:
            if only_if_running_since is not None:
                current = plans.get(plan.model)
                if current is None or not current.running or current.started_at != only_if_running_since:
                    return False
            plans[plan.model] = plan
            return True

        if self.folder is None:
            return merge(self.plans)
        written = False

        def change(plans: dict[str, RolloutPlan] | None) -> dict[str, RolloutPlan] | None:
            nonlocal written
            plans = dict(plans or {})
            written = merge(plans)
            return plans if written else None

        self.plans = self._update(change)
        return written

    def sync(self) -> list[RolloutPlan]:
        """Re-reads the shared plans when they changed and writes this worker's tally when it did
        (``run`` calls this twice a second); -> the rollouts due for a decision."""
        if self.folder is None:
            return self.due()
        try:
            stamp = self._path.stat().st_mtime_ns
        except FileNotFoundError:
            stamp = 0
        if stamp != self._stamp:
            self._stamp = stamp
            self.plans = self._read() or {}
        if self._dirty:
            self._dirty = False
            document = {"pid": os.getpid(), "worker": self.worker,
                        "tallies": {m: t.to_json() for m, t in list(self.tallies.items())}}
            atomic_write(self.folder / f"tally-{self.worker}.json", json.dumps(document).encode())
        return self.due()

    def due(self) -> list[RolloutPlan]:
        """Running rollouts whose comparisons, over every worker, reached ``promote_after``."""
        return [plan for plan in self.plans.values() if plan.running and plan.promote_after and
                plan.model in self.tallies and self.figures(plan.model)["comparisons"] >= plan.promote_after]

    async def run(self, every_s: float = WATCH_S) -> None:
        """The watch loop (a task for the worker's lifetime): shares plans and tallies, and decides a
        rollout whose comparisons over every worker reached ``promote_after``."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(every_s)
            try:
                due = await loop.run_in_executor(None, self.sync)
                for plan in due:
                    if self.on_decided is not None:
                        self.on_decided(plan)
            except Exception:  # noqa: BLE001 - the watch must outlive one bad read
                log.exception("rollouts: syncing with the other workers failed")

    # ---- the request path ------------------------------------------------------------------------------

    def active(self, model: str) -> RolloutPlan | None:
        plan = self.plans.get(model)
        return plan if plan is not None and plan.running else None

    def promoted(self, model: str) -> str | None:
        """The candidate a promoted rollout of another model's name routes ``model`` to."""
        plan = self.plans.get(model)
        if plan is not None and plan.state == "promoted" and not plan.candidate_version:
            return plan.candidate_name
        return None

    def choose(self, plan: RolloutPlan) -> str:
        """-> "primary", "candidate" or "shadow" (the primary answers, the candidate is compared)."""
        asked = requested_arm.get()
        arm = asked if asked in ARMS else ("candidate" if self.rng.random() * 100 < plan.split else "primary")
        if arm == "primary" and plan.shadow and asked is None and self.rng.random() * 100 < plan.shadow:
            if len(self._in_flight) >= MAX_SHADOWS_IN_FLIGHT:
                self.skip(plan, "busy")
            else:
                arm = "shadow"
        if self.metrics is not None:
            self.metrics.rollout_request(plan.model, arm)
        return arm

    def spawn(self, plan: RolloutPlan, comparison) -> None:
        """Runs one shadow comparison in the background; it never delays or fails the request."""
        task = asyncio.get_running_loop().create_task(self._guarded(plan, comparison))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _guarded(self, plan: RolloutPlan, comparison) -> None:
        try:
            result = await comparison
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the candidate's failure is a figure, not the client's error
            log.warning("shadow run on %s failed: %s", plan.candidate, exc)
            self.skip(plan, "failed")
            return
        for one in result if isinstance(result, list) else [result]:  # a stacked shadow run: one per request
            if one is None:
                self.skip(plan, "incomparable")
            else:
                self.record(plan, *one)

    def _tally(self, plan: RolloutPlan, measure: str) -> Tally:
        tally = self.tallies.get(plan.model)
        if tally is None or tally.candidate != plan.candidate or tally.started_at != plan.started_at:
            tally = self.tallies[plan.model] = Tally(plan.candidate, measure, plan.started_at)
        return tally

    def spawn_decision(self, decision) -> None:
        """A promotion decision, run in the background once (a later comparison does not start another)."""
        if self._deciding is None or self._deciding.done():
            self._deciding = asyncio.get_running_loop().create_task(decision)
        else:
            decision.close()

    def skip(self, plan: RolloutPlan, reason: str) -> None:
        self._tally(plan, "").skipped += 1
        self._dirty = True
        if self.metrics is not None:
            self.metrics.shadow_skipped(plan.model, reason)

    def record(self, plan: RolloutPlan, measure: str, value: float) -> None:
        value = min(value, PSNR_CAP_DB)
        tally = self._tally(plan, measure)
        tally.measure = measure
        tally.count += 1
        tally.total += value
        self._dirty = True
        if self.metrics is not None:
            self.metrics.shadow_compared(plan.model, plan.candidate, measure, value)
        current = self.plans.get(plan.model)
        if current is not None and current.running and current.promote_after and \
                tally.count >= current.promote_after and self.on_decided is not None:
            self.on_decided(current)  # this worker alone has enough; otherwise the watch loop counts every worker's

    # ---- figures and decisions ---------------------------------------------------------------------

    def figures(self, model: str) -> dict:
        """Every live worker's comparisons for the current rollout of ``model``: count, mean, skipped."""
        plan = self.plans.get(model)
        if plan is None:
            return {"comparisons": 0, "mean": None, "measure": None, "skipped": 0}
        tallies = []
        if self.folder is not None:
            for path in self.folder.glob("tally-*.json"):
                try:
                    document = json.loads(path.read_bytes())
                except (OSError, ValueError):
                    continue
                if document["worker"] == self.worker:
                    continue  # this worker's own tally: counted from memory below
                if not process_alive(document["pid"]):
                    path.unlink(missing_ok=True)
                    continue
                tallies.append(document["tallies"].get(model))
        own = self.tallies.get(model)
        tallies.append(own.to_json() if own is not None else None)
        current = [t for t in tallies if t and t["candidate"] == plan.candidate and t["started_at"] == plan.started_at]
        count = sum(t["count"] for t in current)
        total = sum(t["total"] for t in current)
        measure = next((t["measure"] for t in current if t["measure"]), None)
        return {"comparisons": count, "mean": total / count if count else None, "measure": measure,
                "skipped": sum(t["skipped"] for t in current)}

    def refresh(self) -> None:
        """Re-reads the shared plans now (model control's calls: the answer is every worker's state,
        not this worker's as of its last watch)."""
        if self.folder is not None:
            self.plans = self._read() or {}

    def status(self, model: str) -> dict:
        plan = self.plans.get(model)
        if plan is None:
            return {"model": model, "state": "none"}
        return {**plan.to_json(), "figures": self.figures(model)}


# ---- the measures (each task's own; the primary's answer is the reference) ---------------------------

def top1_agreement(primary, candidate) -> float:
    """The share of rows whose highest-scoring class is the same."""
    import numpy as np

    a = np.asarray(primary).reshape(len(primary), -1).argmax(axis=1)
    b = np.asarray(candidate).reshape(len(candidate), -1).argmax(axis=1)
    return float((a == b).mean())


def mean_iou(primary, candidate, classes: int) -> float:
    """Mean over the classes either mask holds of intersection / union (the primary's mask as truth)."""
    import numpy as np

    a, b = np.asarray(primary).ravel(), np.asarray(candidate).ravel()
    joint = np.bincount(a * classes + b, minlength=classes * classes).reshape(classes, classes)
    inter = np.diag(joint).astype(np.float64)
    union = joint.sum(0) + joint.sum(1) - inter
    present = union > 0
    return float((inter[present] / union[present]).mean()) if present.any() else 1.0


def psnr_db(primary, candidate, value_range: float = 1.0) -> float:
    import numpy as np

    mse = float(np.mean((np.asarray(primary, np.float64) - np.asarray(candidate, np.float64)) ** 2))
    return PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, 10 * math.log10(value_range ** 2 / mse))


def token_agreement(primary: list[int], candidate: list[int]) -> float:
    """The share of positions (over the longer generation) holding the same token."""
    longest = max(len(primary), len(candidate))
    if not longest:
        return 1.0
    return sum(a == b for a, b in zip(primary, candidate)) / longest
