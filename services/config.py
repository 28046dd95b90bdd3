"""Typed serving configuration: defaults in code, overridden by ``SUITE_<FIELD>`` environment
variables (containers, Kubernetes), overridden in turn by ``bentoml serve --arg <field>=<value>``.

    SUITE_WORKERS=1 bentoml serve                    # one worker process
    bentoml serve --arg batching=false --arg max_queue_delay_ms=2
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from common.resources import available_cores, cgroup_memory_limit, worker_count
from contract import MODEL_NAME


@dataclass(frozen=True)
class ServingConfig:
    models: tuple[str, ...] = ()  # served model names (store names); empty = each task's default model (classify,
    #   segment, generate, denoise, sample) plus every other model in the store of a registered task (the benchmark
    #   models, imported models), found at start-up and, later, by model control and repository_poll_s
    default_models: bool = True  # serve each task's default model (classify, segment, ...) even before the store has
    #   it (readiness waits for it); false: serve what the store holds (a pod serving only its users' own models)
    model_dir: str = ""  # a folder of more models, in the model store's layout (<name>/<version>/: the models/ folder
    #   of the BENTOML_HOME `python -m export import` wrote to), read beside BentoML's store: users' own models
    #   mounted into the container at run time
    workers: int = 0  # HTTP/gRPC worker processes; 0 = one per available core
    intra_op_threads: int = 0  # ONNX Runtime threads per session; 0 = available cores / workers
    inter_op_threads: int = 1  # ONNX Runtime threads running independent graph nodes at once per session
    providers: tuple[str, ...] = ()  # ONNX Runtime providers in order; empty = CUDA when usable, else CPU
    batching: bool = True  # dynamic batching in process; false = every request runs alone
    max_batch_size: int = 64  # rows per session run; also capped by each contract's max_batch
    max_queue_delay_ms: float = 0.0  # how long a batch waits for companions once the model is idle
    max_queue: int = 256  # requests waiting per model and worker; more are refused with 503 at once
    max_queue_wait_ms: float = 1000.0  # a request whose expected wait in its model's queue is longer is refused with
    #   503 + Retry-After at once (Triton's queue policy timeout, applied on arrival); 0 = no time budget
    repository_poll_s: float = 0.0  # every this many seconds, a model following the newest stored version switches to
    #   a newer export found in the store (Triton's poll mode); 0 = only on POST /v2/repository/models/<name>/load
    model_limits: tuple[str, ...] = ()  # per-model overrides of the limits in PER_MODEL_LIMITS, "model.limit=value"
    #   entries: SUITE_MODEL_LIMITS="denoise.max_queue=32,generate.text_max_waiting=16"
    batch_concurrency: int = 2  # batches of one model running at once per worker: with two, a worker can use a
    #   second core while the other worker idles (measured: denoise 58 -> 96 req/s at 8 connections)
    grpc_port: int = 9000  # Open Inference Protocol gRPC; 0 = no gRPC server
    host: str = "0.0.0.0"  # the address the gRPC and probe ports bind (give `bentoml serve --host` the same one;
    #   `make serve` does)
    grpc_host: str = ""  # empty = host
    http_port: int = 3000  # native HTTP, OIP REST and OpenAI routes (`bentoml serve --port` overrides it)
    probe_port: int = 3001  # /livez, /readyz and /metrics answered by a thread of each worker, never behind requests
    #   (the port for Kubernetes probes; every worker binds it with SO_REUSEPORT); 0 = none
    access_log: bool = False  # one log line per request (BentoML's access log); off like most production servers
    log_level: str = "warning"  # the suite's own log (model loads, rollouts, listeners): debug, info, warning or
    #   error; warning keeps the start-up quiet (one line per worker is always shown). BentoML's are its own
    tracing: bool = False  # OpenTelemetry spans (request, queue, batch, session run; services/tracing.py), exported
    #   as the OTEL_* environment says (OTLP over HTTP to OTEL_EXPORTER_OTLP_ENDPOINT by default)
    bentoml_metrics: bool = False  # BentoML's per-path HTTP metrics too (the suite's per-model ones are always on)
    keepalive_requests: int = 100  # a keep-alive connection closes after about this many requests (nginx's
    #   keepalive_requests), so long-lived client connections spread over the workers; 0 = never
    keepalive_streams: int = 10  # the same after streamed responses (text), whose length makes a reconnection cheap;
    #   8 streams, two server starts x two runs: 2,659-3,162 tokens/s with 10, 2,170-3,427 with 100 (the split of
    #   connections over the workers decides a run)
    max_body_bytes: int = 64 * 1024 * 1024  # the ceiling of every route's body limit (413 before the body is read);
    #   each route's own limit is lower: image routes from their models' pixel limits, OIP inference from the model's
    #   contract (its inputs' largest tensors), every other JSON route max_json_bytes
    max_json_bytes: int = 1024 * 1024  # bodies of the JSON routes (/generate, /sample, OpenAI, model control)
    memory_limit: str = ""  # the memory the server's whole process tree may use ("1536Mi", "2G", bytes); empty = the
    #   cgroup's memory.max, else no budget. Each worker's request budget is its share of memory_fraction of it minus
    #   what the worker holds after loading its models; requests past it wait for memory, or get 413 when they never fit
    memory_fraction: float = 0.8  # of memory_limit, for the whole tree (the rest is headroom below the OOM kill)
    memory_wait_ms: float = 10000.0  # how long a request waits for budget before 503 + Retry-After
    tile_size: int = 512  # fully convolutional models run large images tile by tile (each this square plus the overlap)
    max_connections: int = 4096  # open HTTP connections per worker; more get 503 and are closed at once
    header_timeout_s: float = 10.0  # a connection that has not sent its request headers within this is closed (408)
    body_timeout_s: float = 30.0  # a request body not received within this is refused (408)
    model_control: str = "none"  # "none": the repository's load/unload answer 403 (Triton's --model-control-mode=none);
    #   "explicit": they are served and need admin_key
    admin_key: str = field(default="", repr=False)  # the key model control needs ("Authorization: Bearer <key>"),
    #   distinct from api_key; SUITE_ADMIN_KEY or SUITE_ADMIN_KEY_FILE
    control_dir: str = ""  # where the workers share the wanted model state; empty = <BENTOML_HOME>/control
    text_max_live: int = 32  # sequences a text model decodes together per worker (capped by its contract's max_batch)
    text_max_waiting: int = 64  # text requests waiting for a row per worker; more are refused with 503 / UNAVAILABLE
    text_prefill_tokens: int = 2048  # padded prompt tokens prefilled in one session run (bounds the others' stall)
    text_max_choices: int = 8  # n: choices per prompt of one OpenAI request
    text_max_inputs: int = 32  # prompts of one completions request, inputs of one embeddings request
    text_prompt_logprobs_elements: int = 16_000_000  # prompt tokens x vocabulary of an echo-with-logprobs request
    #   (its every prompt position's logits at once: 64 MB at this limit)
    text_stream_interval_ms: float = 10.0  # a stream's reader is woken at most this often (first and last chunk at
    #   once); text in between goes out joined. Measured at 8 streams: 2,100-2,600 tokens/s with 0, 3,100 with 10
    variant: str = "auto"  # which export variant answers a request that names a model without a version: fp32, int8,
    #   fp16, or auto = the fastest stored variant for this server's provider (on a CPU the one whose gate measured the
    #   most speed over fp32, so int8 where it was shipped; on CUDA fp16 where it was shipped); else fp32
    model_variants: tuple[str, ...] = ()  # per-model overrides, "model=variant": SUITE_MODEL_VARIANTS="classify=fp32"
    rollouts: tuple[str, ...] = ()  # canary / shadow rollouts started with the server (services/rollout.py), each
    #   "model=candidate;split=10;shadow=10;promote_after=200;min_agreement=0.95" (candidate: another served model
    #   of the task, or model:version); model control's /rollout routes start, promote and stop them at run time
    payload_log: str = ""  # sampled request records as JSON lines: "stdout", or a file every worker appends to
    #   (rotated by size); empty = off. Written by a thread: a writer that falls behind drops records (counted)
    payload_log_sample: float = 1.0  # the share of requests recorded (0..1)
    payload_log_raw: bool = False  # the raw input in each record too (up to 1 MiB; images base64), not only a summary
    payload_log_max_bytes: int = 64 * 1024 * 1024  # the file's size before it is rotated to <file>.1
    payload_log_backups: int = 5  # rotated files kept
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the HTTP API ("https://app.example.com",
    #   or "*"); empty = no CORS headers at all (browsers then refuse cross-origin calls). Preflights are answered
    #   before the API key is checked, as browsers send them without credentials
    cors_max_age_s: int = 600  # how long a browser may cache a preflight's answer
    api_key: str = field(default="", repr=False)  # when set, every route but health and metrics needs
    #   "Authorization: Bearer <key>" (gRPC: that metadata); empty = open. Prefer SUITE_API_KEY to --arg (process lists),
    #   or SUITE_API_KEY_FILE (a file holding the key, e.g. a mounted Secret)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # unknown --arg keys, reported

    def variant_for(self, model: str) -> str:
        """The variant configured for ``model``: its model_variants entry, else ``variant``."""
        for entry in self.model_variants:
            target, _, value = entry.partition("=")
            if target == model:
                return value
        return self.variant

    def limits(self, model: str) -> "ModelLimits":
        """The queueing and batching limits of one model: the global ones, then its overrides."""
        values = {name: getattr(self, name) for name in PER_MODEL_LIMITS}
        for entry in self.model_limits:
            head, _, raw = entry.partition("=")
            target, _, name = head.rpartition(".")
            if target == model:
                values[name] = parse_value(name, PER_MODEL_LIMITS[name], raw)
        return ModelLimits(**values)

    @property
    def grpc_bind_host(self) -> str:
        return self.grpc_host or self.host

    @property
    def worker_count(self) -> int:
        return worker_count(self.workers)

    @property
    def session_threads(self) -> int:
        return self.intra_op_threads or max(1, available_cores() // self.worker_count)

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, arguments: Mapping[str, Any] | None = None) -> "ServingConfig":
        """Defaults <- SUITE_* environment <- ``bentoml serve --arg`` (the latter read from BentoML
        when ``arguments`` is not given)."""
        environ = os.environ if environ is None else environ
        if arguments is None:
            arguments = bento_arguments()
        values: dict[str, Any] = {}
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
        for name, f in fields.items():
            raw = environ.get(f"SUITE_{name.upper()}")
            if raw is not None and raw != "":
                values[name] = parse_value(name, f.type, raw)
        for secret in ("api_key", "admin_key"):
            key_file = environ.get(f"SUITE_{secret.upper()}_FILE")
            if key_file and secret not in values:
                # A Kubernetes Secret mounted as a file: the key stays out of the process environment.
                try:
                    values[secret] = Path(key_file).read_text().strip()
                except OSError as exc:
                    raise ValueError(f"SUITE_{secret.upper()}_FILE: cannot read {key_file}: {exc.strerror}") from None
        unknown = {}
        for name, raw in arguments.items():
            if name in fields:
                values[name] = parse_value(name, fields[name].type, raw)
            else:
                unknown[name] = raw
        config = cls(**values, extra=unknown)
        config.validate()
        return config

    def validate(self) -> None:
        malformed = [m for m in self.models if not MODEL_NAME.fullmatch(m)]
        if malformed:
            raise ValueError(f"models: {malformed} are not model names (lower-case letters, digits, '.', '_', '-')")
        for entry in self.model_limits:
            # The limit name comes last, so a model name may itself hold dots (generate-shakespeare.v2).
            head, eq, raw = entry.partition("=")
            target, dot, name = head.rpartition(".")
            if not dot or not eq or not MODEL_NAME.fullmatch(target) or name not in PER_MODEL_LIMITS:
                raise ValueError(f"model_limits: {entry!r} is not <model>.<limit>=<value> with a model name "
                                 f"and a limit of {list(PER_MODEL_LIMITS)}")
            value = parse_value(name, PER_MODEL_LIMITS[name], raw)
            if value < (1 if name != "max_queue_wait_ms" else 0):
                raise ValueError(f"model_limits: {entry!r} is out of range")
        for entry in (f"variant={self.variant}", *self.model_variants):
            target, eq, value = entry.partition("=")
            if not eq or not MODEL_NAME.fullmatch(target) or value not in VARIANT_CHOICES:
                raise ValueError(f"{entry!r}: a variant is one of {list(VARIANT_CHOICES)} (model_variants entries: "
                                 "<model>=<variant>)")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level: {self.log_level!r} is not one of {list(LOG_LEVELS)}")
        if self.model_control not in MODEL_CONTROL_MODES:
            raise ValueError(f"model_control: {self.model_control!r} is not one of {list(MODEL_CONTROL_MODES)}")
        if self.model_control == "explicit" and not self.admin_key:
            raise ValueError("model_control=explicit needs an admin_key (SUITE_ADMIN_KEY or SUITE_ADMIN_KEY_FILE)")
        if self.admin_key and self.admin_key == self.api_key:
            raise ValueError("admin_key must differ from api_key: a client that may infer must not control models")
        parse_bytes("memory_limit", self.memory_limit)
        if not 0 < self.memory_fraction <= 1:
            raise ValueError("memory_fraction must be in (0, 1]")
        for name in ("workers", "intra_op_threads", "max_queue_delay_ms", "max_queue_wait_ms", "probe_port",
                     "repository_poll_s", "keepalive_requests", "keepalive_streams",
                     "text_max_waiting", "text_stream_interval_ms", "memory_wait_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("inter_op_threads", "max_batch_size", "max_queue", "max_body_bytes", "batch_concurrency",
                     "text_max_live", "text_prefill_tokens", "max_json_bytes", "tile_size", "max_connections",
                     "text_max_choices", "text_max_inputs", "text_prompt_logprobs_elements"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        from services.rollout import RolloutPlan

        models = [RolloutPlan.parse(entry).model for entry in self.rollouts]  # raises on a malformed entry
        if len(set(models)) != len(models):
            raise ValueError(f"rollouts: one rollout per model, got {models}")
        for origin in self.cors_origins:
            if origin != "*" and not re.match(r"^https?://[^/\s]+$", origin):
                raise ValueError(f"cors_origins: {origin!r} is not an origin (scheme://host[:port], no path) or *")
        if not 0 <= self.payload_log_sample <= 1:
            raise ValueError("payload_log_sample must be in [0, 1]")
        if self.payload_log_max_bytes < 4096 or self.payload_log_backups < 0:
            raise ValueError("payload_log_max_bytes must be >= 4096 and payload_log_backups >= 0")
        if self.cors_max_age_s < 0:
            raise ValueError("cors_max_age_s must be >= 0")
        for name in ("header_timeout_s", "body_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")

    @property
    def memory_limit_bytes(self) -> int | None:
        """The tree's memory limit: the setting, else the cgroup's; None when neither says."""
        return parse_bytes("memory_limit", self.memory_limit) or cgroup_memory_limit()

    def control_folder(self) -> Path:
        if self.control_dir:
            return Path(self.control_dir)
        home = os.environ.get("BENTOML_HOME") or str(Path.home() / "bentoml")
        return Path(home) / "control"


VARIANT_CHOICES = ("auto", "fp32", "int8", "fp16")
MODEL_CONTROL_MODES = ("none", "explicit")
LOG_LEVELS = ("debug", "info", "warning", "error")
_UNITS = {"": 1, "k": 1000, "m": 1000 ** 2, "g": 1000 ** 3, "ki": 1024, "mi": 1024 ** 2, "gi": 1024 ** 3}


def parse_bytes(name: str, raw: str) -> int | None:
    """"1536Mi", "2G", "123456" (Kubernetes' quantity suffixes) -> bytes; "" -> None."""
    text = str(raw).strip()
    if not text:
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kKmMgG]i?)?[bB]?", text)
    if not match:
        raise ValueError(f"{name}: cannot read {raw!r} as bytes (e.g. 1536Mi, 2G, 1000000)")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])


PER_MODEL_LIMITS = {"max_queue": "int", "max_queue_wait_ms": "float", "max_batch_size": "int",
                    "text_max_live": "int", "text_max_waiting": "int"}


@dataclass(frozen=True)
class ModelLimits:
    """What ``ServingConfig.limits(model)`` gives: the limits one model's batcher or engine runs with."""

    max_queue: int
    max_queue_wait_ms: float
    max_batch_size: int
    text_max_live: int
    text_max_waiting: int


def parse_value(name: str, kind: Any, raw: Any) -> Any:
    """A string from the environment or the command line -> the field's type."""
    kind = str(kind)
    if not isinstance(raw, str):
        return tuple(raw) if kind.startswith("tuple") and isinstance(raw, (list, tuple)) else raw
    try:
        if kind == "bool":
            lowered = raw.strip().lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(raw)
            return lowered in ("1", "true", "yes", "on")
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind.startswith("tuple"):
            return tuple(p.strip() for p in raw.split(",") if p.strip())
        return raw
    except ValueError:
        raise ValueError(f"{name}: cannot read {raw!r} as {kind}") from None


def bento_arguments() -> dict[str, Any]:
    """``bentoml serve --arg k=v`` values; empty outside a BentoML process."""
    try:
        import bentoml

        return dict(vars(bentoml.use_arguments()))
    except Exception:  # BentoML missing or not configured (unit tests, plain imports)
        return {}
