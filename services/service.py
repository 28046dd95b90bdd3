"""The BentoML service: it only wires the serving core together.

    model store -> ModelRepository (versions, handles, batchers) -> task handlers -> DataPlane
        -> native HTTP + Open Inference Protocol REST + OpenAI completions (one ASGI app mounted at /)
           and OIP gRPC (:9000)

``bentoml serve`` starts ``ServingConfig.worker_count`` worker processes (one per core by default);
each builds its own repository, sessions and batchers, serves HTTP on the shared BentoML port and
gRPC on the shared gRPC port. BentoML keeps what it is good at: process management, /livez,
/readyz, configuration, ``bentoml build``; /metrics is the suite's (every worker's metrics)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os

import bentoml

from common.resources import resident_bytes
from services.bentoml_fixes import cancel_request_timers
from services import tracing
from services.budget import MemoryBudget, tune_allocator, worker_budget
from services.config import ServingConfig
from services.control import ControlFile, ModelControl
from services.dataplane import DataPlane
from services.frontends.asgi import HttpFrontend
from services.frontends.connections import install_http_guard
from services.frontends.native import add_native_routes
from services.frontends.oip_grpc import GrpcFrontend
from services.frontends.oip_rest import add_oip_rest_routes
from services.frontends.openai import add_openai_routes
from services.frontends.openapi import add_openapi_route
from services.frontends.probes import ProbeServer, ProbeState
from services.metrics import ServingMetrics, exposition
from services.repository import ModelRepository, model_store, served_names
from services.payload_log import DriftMonitor, PayloadLog
from services.rollout import RolloutPlan, Rollouts
from services.tasks import default_models, runners_for, task_classes

log = logging.getLogger("services")
# One start-up line per worker, shown at INFO while the rest of "services" stays at the root's WARNING.
startup_log = logging.getLogger("services.startup")
CONFIG = ServingConfig.load()

http_app = HttpFrontend(CONFIG)
add_native_routes(http_app)
add_oip_rest_routes(http_app)
add_openai_routes(http_app)
add_openapi_route(http_app)


def with_cors(app, config: ServingConfig):
    """The HTTP app behind Starlette's CORS middleware when origins are configured (off by
    default): preflights answered from the settings, the allowed origin echoed on answers."""
    if not config.cors_origins:
        return app
    from starlette.middleware.cors import CORSMiddleware

    return CORSMiddleware(app, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                          allow_headers=["authorization", "content-type", "inference-header-content-length"],
                          expose_headers=["retry-after", "inference-header-content-length"],
                          max_age=config.cors_max_age_s)


@bentoml.asgi_app(with_cors(http_app, CONFIG), path="/")
@bentoml.service(
    name="model-suite",
    workers=CONFIG.worker_count,
    traffic={"timeout": 120, "max_concurrency": 1024},
    logging={"access": {"enabled": CONFIG.access_log}},
    # BentoML's own spans stay off: without an exporter they go nowhere, yet building them halved
    # /classify's throughput (measured: 1,000 instead of 1,900 req/s at 32 connections). The suite's
    # spans (services/tracing.py: request, queue, batch, session run) follow the tracing setting.
    tracing={"excluded_urls": ".*"},
    # BentoML's metrics middleware labels by raw path (unbounded for /v2/models/<anything>) and cost
    # 14 % of the throughput; the suite's front-ends count per model and serve /metrics themselves.
    metrics={"enabled": CONFIG.bentoml_metrics},
    http={"port": CONFIG.http_port},
)
class Suite:
    # Each task's default model, declared so that `bentoml build` packs its newest version into the
    # bento (`bentoml serve` then requires it in the store). A server of its users' own models only
    # (default_models=false) declares none: it serves what the store holds. The class body's
    # namespace is a dict, so the declarations can come from the task registry.
    if CONFIG.default_models:
        locals().update({f"{name}_model": bentoml.models.BentoModel(name) for name in default_models()})

    def __init__(self) -> None:
        if CONFIG.extra:
            log.warning("ignoring unknown --arg keys %s", sorted(CONFIG.extra))
        cancel_request_timers()  # before the first request; see services/bentoml_fixes.py
        # BentoML logs three lines per worker as it starts (and five as it stops): 49 start-up lines
        # on a 16-core machine, past the first run's 60. Its warnings and errors still show; ours
        # is one line per worker, in start_listeners.
        logging.getLogger("bentoml.serve").setLevel(logging.WARNING)
        log.setLevel(CONFIG.log_level.upper())  # the root's WARNING unless log_level says otherwise
        startup_log.setLevel(logging.INFO)
        if CONFIG.tracing:
            tracing.configure()  # this worker's tracer provider and exporter, from OTEL_* (services/tracing.py)
        # uvicorn reads its protocol class when a connection arrives, after this start-up hook.
        install_http_guard(CONFIG.max_connections, CONFIG.header_timeout_s, CONFIG.body_timeout_s)
        tune_allocator()  # before the models allocate: large buffers go back to the kernel when freed
        # Workers share one listening socket and uvloop's libuv accepts every pending connection at
        # once, so one worker can take most connections of a load test (measured splits of 32: 31/1,
        # 28/4, 23/9). One accept per wake-up evens that out somewhat (25/7, 22/10, 19/13 seen);
        # keepalive_requests does the rest over time. libuv reads this when uvicorn starts
        # listening, which is after this start-up hook.
        if not os.environ.get("UV_TCP_SINGLE_ACCEPT"):  # "0" turns it off
            os.environ["UV_TCP_SINGLE_ACCEPT"] = "1"
        store = model_store(CONFIG)
        tasks, defaults = tuple(task_classes()), default_models() if CONFIG.default_models else ()
        self.served = served_names(CONFIG, store, defaults, tasks)
        self.metrics = ServingMetrics(self.served)
        self.repository = ModelRepository(CONFIG, store, observer_for=self.metrics.observer,
                                          runners=runners_for(CONFIG, self.metrics.observer),
                                          defaults=defaults, tasks=tasks)
        # The wanted state shared by this server's workers: a worker replacing a killed one starts in
        # the state model control left the others in. A model that fails to load is logged, named
        # by /readyz and refused with 503; the others serve.
        self.control = ModelControl(self.repository, ControlFile.for_server(CONFIG.control_folder(), CONFIG.http_port),
                                    CONFIG.worker_count, refresh_s=CONFIG.repository_poll_s)
        self.control.start()
        # The request budget: this worker's share of the limit, less what it holds with its models loaded.
        budget = MemoryBudget(worker_budget(CONFIG.memory_limit_bytes, CONFIG.memory_fraction, CONFIG.worker_count,
                                            resident_bytes()), CONFIG.memory_wait_ms / 1000)
        log.info("memory budget for requests: %s per worker", budget.describe())
        rollouts = Rollouts([RolloutPlan.parse(entry) for entry in CONFIG.rollouts], self.control.file.folder,
                            self.metrics)
        payload_log = PayloadLog(CONFIG.payload_log or None, CONFIG.payload_log_sample, CONFIG.payload_log_raw,
                                 CONFIG.payload_log_max_bytes, CONFIG.payload_log_backups, self.metrics)
        self.plane = DataPlane(self.repository, server_version=bentoml.__version__, control=self.control, budget=budget,
                               rollouts=rollouts, payload_log=payload_log, drift=DriftMonitor(self.metrics))
        for plan in rollouts.plans.values():
            if plan.running:
                self.plane.check_rollout(plan)  # a configured candidate that cannot serve stops the start-up
        http_app.bind(self.plane, self.metrics)
        self.grpc = (GrpcFrontend(self.plane, CONFIG, self.metrics) if CONFIG.grpc_port else None)
        self.probes = (ProbeServer(ProbeState(self.plane.not_ready_reason), CONFIG.probe_port, CONFIG.host,
                                   exposition) if CONFIG.probe_port else None)
        self._control_task = self._rollouts_task = None
        # What start-up allocated lives as long as the worker: keep it out of the collector's full
        # passes, which otherwise stall every request in flight (the tail latency under load).
        gc.collect()
        gc.freeze()

    @bentoml.on_startup
    async def start_listeners(self) -> None:
        if self.grpc is not None:
            await self.grpc.start()
        if self.probes is not None:
            self.probes.start()
        self._control_task = asyncio.get_running_loop().create_task(self.control.run())
        self._rollouts_task = asyncio.get_running_loop().create_task(self.plane.rollouts.run())
        ports = [f"{name} :{port}" for name, port in (("gRPC", CONFIG.grpc_port), ("probes", CONFIG.probe_port)) if port]
        # The test and benchmark servers wait for this line from every worker (loadtest/servers.py).
        startup_log.info("worker %s listening (%s); models: %s", bentoml.server_context.worker_index,
                         ", ".join(ports) or "HTTP only", ", ".join(self.served) or "none")

    async def __is_ready__(self) -> bool:
        """BentoML's /readyz: every model loaded and the gRPC port bound in this worker."""
        return self.plane.ready()

    @bentoml.on_shutdown
    async def stop(self) -> None:
        if self.probes is not None:
            self.probes.state.stopping = True
        for task in (self._control_task, self._rollouts_task):
            if task is not None:
                task.cancel()
        if self.grpc is not None:
            await self.grpc.stop()
        await self.repository.close()
        await asyncio.get_running_loop().run_in_executor(None, self.plane.payload_log.close)
        if self.probes is not None:
            self.probes.stop()
        await asyncio.get_running_loop().run_in_executor(None, tracing.shutdown)  # exports what is buffered
