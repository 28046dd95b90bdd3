"""The data plane: transport-neutral health, metadata and inference over the model repository and
the task handlers (KServe's ``dataplane.py``). Front-ends (native HTTP, Open Inference Protocol
REST and gRPC) only translate their wire format to these calls and back; nothing here knows HTTP."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterable, Mapping

import numpy as np

from services.budget import MemoryBudget
from services.errors import ServingError, bad_request, unavailable
from services.payload_log import DriftMonitor, PayloadLog, record, summarize_answer, summarize_image, \
    summarize_tensors, summarize_value
from services.rollout import WATCH_S, RolloutPlan, Rollouts, token_agreement
from contract import ModelContract
from services.repository import ModelHandle, ModelRepository, WantedState, batch_major
from services.tasks import task_classes
from services.tasks.base import EventStream, NativeRoute, TaskHandler

log = logging.getLogger("services.dataplane")
SERVER_NAME = "model-suite"
PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ["binary_tensor_data", "parameters", "model_repository"]
Tensors = dict[str, np.ndarray]


@dataclass
class InferResult:
    model: str
    version: str
    outputs: Tensors
    parameters: dict[str, Any]
    final: bool = True  # the last result of its request (decoupled inference sends several)


class DataPlane:
    def __init__(self, repository: ModelRepository, server_version: str = "", control: Any = None,
                 budget: MemoryBudget | None = None, rollouts: Rollouts | None = None,
                 payload_log: PayloadLog | None = None, drift: DriftMonitor | None = None):
        self.repository = repository
        self.payload_log = payload_log or PayloadLog(None)  # sampled request records (services/payload_log.py)
        self.drift = drift  # OOD and predicted-class drift per model; None: not measured
        self._observing = self.payload_log.enabled or drift is not None
        self.rollouts = rollouts or Rollouts([])  # canary and shadow rollouts (services/rollout.py)
        self.rollouts.on_decided = self._decided
        self._shadow_queues: dict[tuple, ShadowQueue] = {}
        self.server_version = server_version
        self.control = control  # model control across workers (services.control.ModelControl); None: this process
        self.budget = budget or MemoryBudget(None)  # this worker's memory for requests in flight
        self._readiness: dict[str, Callable[[], str | None]] = {}
        self._handlers: dict[str, TaskHandler] = {task: kind(self.budget, repository.config)
                                                  for task, kind in task_classes().items()}
        self._variant_table: dict[str, dict[str, tuple[str, float]]] | None = None
        self._body_limits: dict[Any, int] = {}  # by task (image routes), by (model, binary, json limit) (OIP)
        self._cuda: bool | None = None  # whether sessions run on CUDA (decides the auto variant)
        self._defaults: dict[str, str | None] = {}  # task -> the model its native requests get by default

    # ---- health ----------------------------------------------------------------------------------

    def add_readiness_check(self, name: str, check: Callable[[], str | None]) -> None:
        """``check`` returns None when its part is ready, else why not (a front-end's listener)."""
        self._readiness[name] = check

    def not_ready_reason(self) -> str | None:
        not_ready = self.repository.not_ready()
        if not_ready:
            return "; ".join(f"{name}: {why}" for name, why in not_ready.items())
        for name, check in self._readiness.items():
            reason = check()
            if reason is not None:
                return f"{name}: {reason}"
        return None

    def ready(self) -> bool:
        return self.not_ready_reason() is None

    def require_ready(self) -> None:
        reason = self.not_ready_reason()
        if reason is not None:
            raise unavailable("server", f"not ready: {reason}", retry_after=1)

    def admission_error(self, model: str) -> ServingError | None:
        """Why a request for ``model`` (its serving version) would be refused now, or None; cheap,
        so front-ends ask before reading a request's body."""
        return self.repository.admission_error(self.route(model)) if model else None

    # ---- limits known before a request's body is read ------------------------------------------------

    def _routed_contract(self, name: str, version: str | None):
        """The contract a request for ``name`` (and ``version``) is checked against: the routed
        variant's without a version; 404 for a model this server does not serve."""
        return self.repository.contract(name if version else self.route(name), version)

    def _served_contracts(self):
        """The contract of every served model that has a readable one (a corrupt artifact is
        reported by readiness, not here)."""
        for name in self.repository.names:
            if self.repository.versions(name):
                try:
                    yield name, self.repository.contract(name)
                except ServingError:
                    continue

    def image_body_limit(self, task: str | None) -> int:
        """The largest upload an image route of ``task`` takes: the largest its served models take."""
        if task not in self._body_limits:
            handler = self._handlers.get(task or "")
            self._body_limits[task] = max((handler.upload_limit(c) for _, c in self._served_contracts()
                                           if handler is not None and c.task == task), default=0)
        return self._body_limits[task]

    def tensor_body_limit(self, model: str | None, binary: bool, json_limit: int) -> int:
        """The largest OIP inference body ``model`` can need (its contract's largest tensors, binary
        or as JSON numbers); computed once per model, kind and limit."""
        key = (model, binary, json_limit)
        if key not in self._body_limits:
            name, _, version = (model or "").partition(":")
            contract = self._routed_contract(name, version or None)
            limit = self.handler(contract).body_limit(contract, binary, json_limit)
            self._body_limits[key] = limit if limit is not None else 1 << 62  # the global ceiling applies
        return self._body_limits[key]

    def grpc_message_limit(self) -> int:
        """The largest binary inference message any served model can need."""
        return max((self.tensor_body_limit(name, True, 1 << 20) for name, _ in self._served_contracts()),
                   default=4 * 1024 * 1024)

    def runs_long(self, model: str | None) -> bool:
        """Whether a request for ``model`` may run long enough to be worth cancelling when its client
        leaves (text generation, native-size images); False for a model this server does not serve
        (the request is refused anyway)."""
        try:
            return self.handler(self._routed_contract(model, None)).runs_long
        except ServingError:
            return False

    def check_declared(self, model: str, version: str | None, declared: Iterable[tuple[str, Any, Any]]) -> None:
        """Each (name, datatype, shape) a request declares, against the model's contract, before
        any tensor data is decoded."""
        contract = self._routed_contract(model, version)
        handler = self.handler(contract)
        seen = set()
        for name, datatype, shape in declared:
            if name in seen:
                raise bad_request(name, "input given twice")
            seen.add(name)
            handler.check_declared(contract, name, datatype, shape)

    # ---- model control (the Open Inference Protocol's model repository extension) ----------------

    def repository_index(self, ready_only: bool = False) -> list[dict]:
        """Every stored version of every served model, with its state; re-reads the store first."""
        self.repository.refresh()
        entries = self.repository.index()
        return [e for e in entries if e["state"] == "READY"] if ready_only else entries

    async def load_model(self, name: str, version: str | None = None) -> dict:
        """Loads ``version`` (default: the newest in the store, then followed by periodic refresh)
        in every worker and makes it the serving version; the version it replaces finishes its
        running requests first. A load that fails leaves the previous version serving."""
        return await self._control(name, WantedState(True, version or None))

    async def unload_model(self, name: str) -> dict:
        """Unloads every version of ``name`` in every worker once their running requests finish;
        requests for it are refused (503) until it is loaded again."""
        return await self._control(name, WantedState(False))

    async def _control(self, name: str, wanted: WantedState) -> dict:
        self._variant_table = None  # a new version may be (or stop being) a variant
        self._body_limits.clear()
        self._defaults.clear()
        if name not in self.repository.names:  # stored since start-up (an import): served from now on
            self.repository.discover()
        self.repository.versions(name)  # 404 for a model this server does not serve
        if wanted.version:  # 404 for a version not in the store (apply re-reads it in every worker anyway)
            self.repository.refresh([name])
            self.repository.stored(name, wanted.version)
        if self.control is not None:
            errors, workers = await self.control.change({name: wanted})
        else:
            errors, workers = await self.repository.apply({name: wanted}), 1
        if name in errors:
            raise bad_request("model", errors[name])
        return {"name": name, "version": self.repository.serving_version(name), "workers": workers}

    # ---- metadata --------------------------------------------------------------------------------

    def server_metadata(self) -> dict:
        return {"name": SERVER_NAME, "version": self.server_version, "extensions": EXTENSIONS}

    def model_ready(self, name: str, version: str | None = None) -> bool:
        """Loaded and warmed up. Any stored version can serve: one not loaded yet loads on first use."""
        return self.repository.is_ready(name, version)

    def model_metadata(self, name: str, version: str | None = None) -> dict:
        contract = self.repository.contract(name, version)
        extra_in, extra_out = self.handler(contract).extra_tensors(contract)
        tensors = lambda specs: [{"name": t.name, "datatype": t.oip_datatype, "shape": list(t.shape)} for t in specs]  # noqa: E731
        return {"name": name, "versions": self.repository.versions(name), "platform": PLATFORM,
                "inputs": tensors(contract.inputs) + extra_in, "outputs": tensors(contract.outputs) + extra_out,
                # beyond the protocol's fields (REST only): which export variant this is, and which
                # served model answers a request for it without a version
                "variant": contract.extra.get("variant", "fp32"), "answered_by": self.route(name),
                "task": contract.task}

    def models(self) -> list[dict]:
        """Every served model: newest version, contract, training data and metrics, benchmark
        figures, parity figure, versions. A default model not in the store yet is listed as such."""
        out = []
        for name in self.repository.names:
            if not self.repository.versions(name):
                out.append({"name": name, "version": None, "ready": False, "versions": [],
                            "reason": "not in the store"})
                continue
            stored = self.repository.stored(name)
            contract = self.repository.contract(name)
            meta = stored.metadata
            out.append({"name": name, "version": stored.version, "task": contract.task, "family": contract.family,
                        "source": meta.get("source", "training"),
                        "architecture": contract.architecture, "contract": json.loads(contract.to_json()),
                        "profile": meta.get("profile"), "data_description": meta.get("data_description"),
                        "metrics": meta.get("metrics"), "benchmark": meta.get("benchmark") or {},
                        "parity_max_abs_diff": meta.get("parity_max_abs_diff"),
                        "data_fingerprint": meta.get("data_fingerprint"), "created_at": meta.get("created_at"),
                        "git_revision": meta.get("git_revision"), "versions": self.repository.versions(name),
                        "variant": meta.get("variant", "fp32"), "variant_of": meta.get("variant_of"),
                        "gate": meta.get("gate"), "answered_by": self.route(name),
                        "ready": self.repository.is_ready(name)})
        return out

    # ---- inference on tensors (Open Inference Protocol) --------------------------------------------

    async def infer(self, name: str, version: str | None, feeds: Tensors, parameters: Mapping[str, Any] | None = None,
                    requested: Iterable[str] | None = None) -> InferResult:
        handle = await self._handle(name, version)
        handler = self.handler(handle.contract)
        started = time.perf_counter()
        result = await handler.infer_tensors(handle, feeds, parameters or {})
        outputs = result.outputs
        if self._observing:
            self._observe_tensors(handle, feeds, outputs, time.perf_counter() - started)
        if requested is not None:
            requested = list(requested)
            unknown = [n for n in requested if n not in outputs]
            if unknown:
                raise bad_request(unknown[0], f"unknown output tensor; this request can return {list(outputs)}")
            outputs = {n: outputs[n] for n in requested}
        return InferResult(handle.name, handle.version, outputs, result.parameters)

    # ---- the tasks' native routes --------------------------------------------------------------------

    def task(self, task: str) -> TaskHandler:
        return self._handlers[task]

    def tasks(self) -> list[TaskHandler]:
        return list(self._handlers.values())

    def served_models(self, task: str) -> list[dict]:
        """Served models of ``task`` with a stored version: name, newest version, created (what the
        OpenAI API lists for text, what the OpenAPI document names per route)."""
        out = []
        for name, contract in self._served_contracts():
            if contract.task == task:
                stored = self.repository.stored(name)
                out.append({"name": name, "version": stored.version, "created": int(stored.created_at)})
        return out

    def default_model(self, task: str) -> str | None:
        """The model a native request of ``task`` gets when it names none: the task's own default
        when this server serves it, else the first served model of the task."""
        # Asked on every native request that names no model: the scan of the store's contracts is
        # done once per task, again after model control changes what is served.
        if self._defaults.get(task) is None:  # none served yet: look again (a poll may have found one)
            handler = self._handlers[task]
            if handler.default_model in self.repository.names:
                self._defaults[task] = handler.default_model
            else:
                served = self.served_models(task)
                self._defaults[task] = served[0]["name"] if served else None
        return self._defaults[task]

    async def task_handle(self, task: str, model: str | None) -> tuple[TaskHandler, ModelHandle]:
        """The handler of ``task`` and a ready handle for ``model`` ("name" or "name:version"; the
        task's default without one); 400 for a model of another task."""
        name, _, version = (model or self.default_model(task) or "").partition(":")
        if not name:
            raise bad_request("model", f"this server serves no {task} model")
        handle = await self._handle(name, version or None)
        if handle.contract.task != task:
            raise bad_request("model", f"model {name!r} serves {handle.contract.task}, not {task}")
        return self._handlers[task], handle

    async def run_native(self, task: str, route: NativeRoute, model: str | None, image: bytes | None,
                         values: dict[str, Any]) -> Any:
        """One native request: the route's work on the chosen model."""
        handler, handle = await self.task_handle(task, model)
        if not self._observing:
            return await getattr(handler, route.run)(handle, image, values)
        started = time.perf_counter()
        answer = await getattr(handler, route.run)(handle, image, values)
        if isinstance(answer, dict) and self.drift is not None and "predictions" in answer:
            top = answer["predictions"][0]["class_id"] if answer["predictions"] else None
            self.drift.observe(handle.name, handle.contract, top, answer.get("ood_score"))
        if self.payload_log.sampled():
            raw = self.payload_log.raw
            request = {"fields": {k: summarize_value(v, raw) for k, v in values.items()}}
            if image is not None:
                request["image"] = summarize_image(image, raw)
            if isinstance(answer, EventStream):  # recorded when the stream ends
                answer.events = self._logged_stream(answer.events, handle, route.path, request, started)
            else:
                self.payload_log.write(record(handle, route.path, time.perf_counter() - started, request,
                                              summarize_answer(answer), answer.get("ood_score")
                                              if isinstance(answer, dict) else None))
        return answer

    async def _logged_stream(self, events: AsyncIterator[dict], handle: ModelHandle, route: str, request: dict,
                             started: float) -> AsyncIterator[dict]:
        count, last = 0, {}
        async for event in events:
            count += 1
            last = event
            yield event
        summary = {k: v for k, v in summarize_answer(last).items() if k in ("finish_reason", "usage", "seed")}
        self.payload_log.write(record(handle, route, time.perf_counter() - started, request,
                                      {"events": count, **summary}))

    def _observe_tensors(self, handle: ModelHandle, feeds: Tensors, outputs: Tensors, seconds: float) -> None:
        """Drift and the payload log for a tensor request (Open Inference Protocol)."""
        contract = handle.contract
        ood = outputs.get("ood_score")
        if self.drift is not None and contract.task == "image-classification":
            scores = outputs.get(contract.outputs[0].name)
            classes = scores.reshape(len(scores), -1).argmax(axis=1) if scores is not None and scores.ndim else None
            self.drift.observe(handle.name, contract, classes, ood)
        if self.payload_log.sampled():
            self.payload_log.write(record(handle, "infer", seconds, summarize_tensors(feeds, self.payload_log.raw),
                                          summarize_tensors(outputs, False),
                                          ood[0] if ood is not None and ood.size == 1 else None))

    async def infer_stream(self, name: str, version: str | None, feeds: Tensors,
                           parameters: Mapping[str, Any] | None = None) -> AsyncIterator[InferResult]:
        """Decoupled inference: a text model's results chunk by chunk, any other model's at once.
        Bad input raises here, before the first result."""
        handle = await self._handle(name, version)
        results = await self.handler(handle.contract).stream_tensors(handle, feeds, parameters or {})

        async def named() -> AsyncIterator[InferResult]:
            async for result in results:
                yield InferResult(handle.name, handle.version, result.outputs, result.parameters, result.final)

        return named()

    async def _handle(self, name: str, version: str | None) -> ModelHandle:
        """The handle a request for ``name`` runs on: the version it names; else, while a rollout of
        ``name`` runs, the arm the rollout chooses (a shadowed request: the primary's handle, which
        also runs the candidate); else the routed variant's serving version."""
        if version:
            return await self.repository.handle(name, version)
        plan = self.rollouts.active(name)
        if plan is None:
            return await self.repository.handle(self.route(name), None)
        arm = self.rollouts.choose(plan)
        if arm != "primary":
            try:
                candidate = await self.repository.handle(plan.candidate_name, plan.candidate_version)
            except ServingError as exc:  # the candidate cannot answer now: the primary does
                self.rollouts.skip(plan, "unavailable")
                log.info("rollout of %s: candidate %s unavailable: %s", name, plan.candidate, exc.message)
                arm = "primary"
            else:
                if arm == "candidate":
                    return candidate
        primary = await self.repository.handle(self.route(name), None)
        if arm == "shadow":
            return ShadowedHandle(primary, candidate, self._shadow_queue(plan, primary, candidate))
        return primary

    def _shadow_queue(self, plan: RolloutPlan, primary: ModelHandle, candidate: ModelHandle) -> ShadowQueue:
        key = (plan.model, plan.started_at, primary.tag, candidate.tag)
        queue = self._shadow_queues.get(key)
        if queue is None:
            self._shadow_queues = {k: q for k, q in self._shadow_queues.items() if k[0] != plan.model}  # older ones
            queue = self._shadow_queues[key] = ShadowQueue(candidate, self.handler(primary.contract), primary.contract,
                                                           plan, self.rollouts)
        return queue

    # ---- rollouts (canary and shadow; model control's admin routes) ---------------------------------

    def check_rollout(self, plan: RolloutPlan) -> None:
        """A candidate must be served, of the primary's task, and take the primary's inputs."""
        if plan.model not in self.repository.names:
            raise ServingError("model", f"model {plan.model!r} is not served", 404)
        primary = self.repository.contract(self.route(plan.model))
        if plan.candidate_version:
            self.repository.refresh([plan.model])
            self.repository.stored(plan.model, plan.candidate_version)  # 404 for a version not in the store
        elif plan.candidate_name not in self.repository.names:
            raise ServingError("candidate", f"model {plan.candidate_name!r} is not served", 404)
        candidate = self.repository.contract(plan.candidate_name, plan.candidate_version)
        if candidate.task != primary.task:
            raise bad_request("candidate", f"{plan.candidate} serves {candidate.task}, {plan.model} {primary.task}")
        theirs = {(t.name, t.dtype, len(t.shape)) for t in candidate.inputs}
        ours = {(t.name, t.dtype, len(t.shape)) for t in primary.inputs}
        if theirs != ours:
            raise bad_request("candidate", f"{plan.candidate} takes other inputs than {plan.model}: "
                                           f"{sorted(theirs)} against {sorted(ours)}")

    def start_rollout(self, fields: Mapping[str, Any]) -> dict:
        try:
            plan = RolloutPlan.from_json(dict(fields))
        except (TypeError, ValueError) as exc:
            raise bad_request("rollout", str(exc)) from None
        if not plan.running:
            raise bad_request("state", "a new rollout runs; end one with the stop or promote call")
        self.check_rollout(plan)
        self.rollouts.set(dataclasses.replace(plan, started_at=0.0, verdict=None))
        return self.rollout_status(plan.model)

    def rollout_status(self, model: str) -> dict:
        self.rollouts.refresh()
        status = self.rollouts.status(model)
        if status.get("state") not in (None, "none"):
            status["threshold"] = self._threshold(self.rollouts.plans[model])
        return status

    def stop_rollout(self, model: str) -> dict:
        self.rollouts.refresh()
        plan = self.rollouts.plans.get(model)
        if plan is None or not plan.running:
            raise ServingError("model", f"no rollout of {model!r} is running", 404)
        self.rollouts.set(dataclasses.replace(plan, state="stopped", verdict=self._verdict(plan, "stopped")),
                          only_if_running_since=plan.started_at)
        return self.rollout_status(model)

    def _threshold(self, plan: RolloutPlan) -> float:
        if plan.min_agreement is not None:
            return float(plan.min_agreement)
        return self.handler(self.repository.contract(self.route(plan.model))).default_min_agreement

    def _verdict(self, plan: RolloutPlan, decision: str) -> dict:
        return {"decision": decision, **self.rollouts.figures(plan.model), "threshold": self._threshold(plan)}

    async def promote(self, model: str, force: bool = False, settle_s: float = WATCH_S + 0.1) -> dict:
        """Promotes the running rollout's candidate when its measured agreement with the primary
        reaches the threshold (``force``: whatever was measured); refuses it (409, with the figures)
        when it does not. A promoted version becomes the model's serving version; a promoted
        variant or model answers the model's requests from then on (until its rollout is replaced).
        ``settle_s``: first wait for every worker's tally to be written (they are every WATCH_S)."""
        if settle_s:
            await asyncio.sleep(settle_s)
        self.rollouts.refresh()
        plan = self.rollouts.plans.get(model)
        if plan is None or not plan.running:
            raise ServingError("model", f"no rollout of {model!r} is running", 404)
        verdict = self._verdict(plan, "promoted")
        count, mean, threshold = verdict["comparisons"], verdict["mean"], verdict["threshold"]
        if not force and (not count or mean < threshold):
            verdict["decision"] = "refused"
            why = "no comparisons yet (give shadow > 0)" if not count else \
                f"mean {verdict['measure']} {mean:.4g} over {count} comparisons is below {threshold:.4g}"
            self.rollouts.set(dataclasses.replace(plan, state="refused", verdict=verdict),
                              only_if_running_since=plan.started_at)
            raise ServingError("candidate", f"candidate {plan.candidate} refused: {why}; the rollout is stopped "
                                            f"and {model} answers every request", 409, details=verdict)
        if not self.rollouts.set(dataclasses.replace(plan, state="promoted", verdict=verdict),
                                 only_if_running_since=plan.started_at):
            return self.rollout_status(model)  # another worker decided first
        if plan.candidate_version:
            await self.load_model(model, plan.candidate_version)
        log.info("rollout of %s: %s promoted (%s)", model, plan.candidate, verdict)
        return self.rollout_status(model)

    def _decided(self, plan: RolloutPlan) -> None:
        """A worker's tally reached ``promote_after``: decide now (in the background)."""
        async def decide() -> None:
            try:
                await self.promote(plan.model, settle_s=0)  # counted already
            except ServingError as exc:
                log.warning("rollout of %s: %s", plan.model, exc.message)

        self.rollouts.spawn_decision(decide())

    # ---- export variants ---------------------------------------------------------------------------

    def route(self, name: str) -> str:
        """The served model that answers a request for ``name`` without a version: its configured
        export variant (``<name>-int8``, ``<name>-fp16``) when that is served and ready, else
        ``name`` itself. ``auto``: on CUDA the fp16 variant; on a CPU the variant whose gate
        measured the most speed over fp32 (shipped variants passed their quality gate)."""
        promoted = self.rollouts.promoted(name)
        if promoted is not None and self.repository.is_ready(promoted):
            return promoted
        variants = self._variants()
        if name not in variants:
            return name
        choice = self.repository.config.variant_for(name)
        if choice == "fp32":
            return name
        ready = {v: (served, speedup) for v, (served, speedup) in variants[name].items()
                 if self.repository.is_ready(served)}
        if choice != "auto":
            return ready.get(choice, (name, 1.0))[0]
        if self._on_cuda():
            return ready.get("fp16", (name, 1.0))[0]
        best, best_speedup = name, 1.0
        for served, speedup in ready.values():
            if speedup > best_speedup:
                best, best_speedup = served, speedup
        return best

    def _variants(self) -> dict[str, dict[str, tuple[str, float]]]:
        """fp32 model name -> {variant: (its served name, its gate's speed-up)}, from the store's
        metadata; read once (model control re-reads it)."""
        if self._variant_table is None:
            table: dict[str, dict[str, tuple[str, float]]] = {}
            for name in self.repository.names:
                if not self.repository.versions(name):
                    continue
                meta = self.repository.stored(name).metadata
                base, variant = meta.get("variant_of"), meta.get("variant", "fp32")
                if base and variant != "fp32":
                    table.setdefault(base, {})[variant] = (name, float((meta.get("gate") or {}).get("speedup", 0.0)))
            self._variant_table = table
        return self._variant_table

    def _on_cuda(self) -> bool:
        if self._cuda is None:
            from common.runtime import choose_providers

            self._cuda = choose_providers(self.repository.config.providers)[0] == "CUDAExecutionProvider"
        return self._cuda

    # ---- helpers ---------------------------------------------------------------------------------

    def handler(self, contract: ModelContract) -> TaskHandler:
        try:
            return self._handlers[contract.task]
        except KeyError:
            raise ServingError("model", f"model {contract.name!r} serves task {contract.task!r}, which this server "
                                        f"has no handler for (tasks: {list(self._handlers)})", 501) from None


class ShadowedHandle(ModelHandle):
    """The primary's handle for one request that a shadow rollout also runs on the candidate: each
    session run (and, for text, each generation) is repeated on the candidate in the background and
    compared by the task's measure; the client gets the primary's answer, never delayed by it."""

    def __init__(self, primary: ModelHandle, candidate: ModelHandle, shadows: "ShadowQueue"):
        self.__dict__.update(primary.__dict__)
        self._primary, self._shadows = primary, shadows
        if primary.engine is not None and candidate.engine is not None:
            self.engine = ShadowEngine(primary.engine, candidate.engine, shadows.plan, shadows.rollouts)

    async def infer(self, feeds: Tensors) -> Tensors:
        outputs = await self._primary.infer(feeds)
        self._shadows.add(feeds, outputs)
        return outputs


class ShadowQueue:
    """One rollout's shadow runs, stacked: nobody waits for them, so the candidate runs the rows of
    many requests in one session run (up to ``max_rows``, or what came in ``max_wait_s``) and each
    request's rows are compared on their own. Measured on /classify at 32 connections: shadowing 10 %
    one request at a time cost 8 % of the throughput (a session run per shadowed request)."""

    def __init__(self, candidate: ModelHandle, handler: TaskHandler, contract: ModelContract, plan: RolloutPlan,
                 rollouts: Rollouts, max_rows: int = 64, max_wait_s: float = 0.05):
        self.candidate, self.handler, self.contract = candidate, handler, contract
        self.plan, self.rollouts = plan, rollouts
        self.stacks = batch_major(contract) and batch_major(candidate.contract)
        self.max_rows = min(max_rows, candidate.contract.max_batch or max_rows)
        self.max_wait_s = max_wait_s
        self._pending: list[tuple[Tensors, Tensors]] = []
        self._rows = 0
        self._signature = None
        self._timer: asyncio.TimerHandle | None = None

    def add(self, feeds: Tensors, outputs: Tensors) -> None:
        if not self.stacks:
            self.rollouts.spawn(self.plan, self._run([(feeds, outputs)]))
            return
        signature = tuple((name, a.shape[1:], a.dtype.str) for name, a in feeds.items())
        if self._pending and signature != self._signature:  # rows of another shape: run what is stacked first
            self.flush()
        self._signature = signature
        self._pending.append((feeds, outputs))
        self._rows += len(next(iter(feeds.values())))
        if self._rows >= self.max_rows:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.max_wait_s, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pending:
            batch, self._pending, self._rows = self._pending, [], 0
            self.rollouts.spawn(self.plan, self._run(batch))

    async def _run(self, batch: list[tuple[Tensors, Tensors]]) -> list:
        handler = self.handler
        feeds = batch[0][0] if len(batch) == 1 else {
            name: np.concatenate([f[name] for f, _ in batch]) for name in batch[0][0]}
        # The shadow run holds memory like a request: it waits for the worker's budget (or fails, counted).
        async with handler.budget.reserve(handler.tensor_cost(self.candidate.contract, feeds), "a shadow run"):
            theirs = await self.candidate.infer(feeds)
        results, start = [], 0
        for request_feeds, outputs in batch:
            rows = len(next(iter(request_feeds.values()))) if self.stacks else None
            mine = theirs if rows is None else {k: v[start:start + rows] for k, v in theirs.items()}
            start += rows or 0
            value = handler.compare(self.contract, outputs, mine)
            results.append(None if value is None else (handler.measure, value))
        return results


class ShadowEngine:
    """A text engine that queues each unconstrained generation on the candidate too (same prompt,
    same sampling parameters and seed) and compares the two generations token by token."""

    def __init__(self, primary: Any, candidate: Any, plan: RolloutPlan, rollouts: Rollouts):
        self._primary, self._candidate, self._plan, self._rollouts = primary, candidate, plan, rollouts

    def __getattr__(self, name: str) -> Any:
        return getattr(self._primary, name)

    def submit(self, requests: list, matchers: list | None = None, prompt_logprobs: bool = False) -> list:
        sequences = self._primary.submit(requests, matchers, prompt_logprobs)
        if prompt_logprobs or any(m is not None for m in matchers or ()):
            self._rollouts.skip(self._plan, "incomparable")  # a constraint's matcher is compiled for the primary
            return sequences
        try:
            theirs = self._candidate.submit([(prompt, dataclasses.replace(params)) for prompt, params in requests])
        except ServingError:
            self._rollouts.skip(self._plan, "busy")
            return sequences
        for mine, other in zip(sequences, theirs):
            self._rollouts.spawn(self._plan, compare_generations(mine, other))
        return sequences


async def compare_generations(primary: Any, candidate: Any, poll_s: float = 0.05):
    """Both generations' tokens once both are done; None when the primary's client left (the
    candidate's row is freed too) or either failed."""
    try:
        while not (primary.done and candidate.done):
            if primary.cancelled:
                candidate.cancel()
                return None
            await asyncio.sleep(poll_s)
    except asyncio.CancelledError:
        candidate.cancel()
        raise
    if primary.cancelled or primary.error is not None or candidate.error is not None or candidate.cancelled:
        return None
    return "token_agreement", token_agreement(primary.tokens, candidate.tokens)
