"""Per-model Prometheus metrics, exported on the suite's ``/metrics``.

Created per worker after BentoML has set ``PROMETHEUS_MULTIPROC_DIR`` (never at import), so every
worker's values reach the one ``/metrics`` page; the queue-depth gauge sums the live workers."""

from __future__ import annotations

from typing import Any

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
OCCUPANCY_BUCKETS = (0.125, 0.25, 0.5, 0.75, 1.0)
OOD_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ServingMetrics:
    """``models``: the served names. Request counts for any other name (a client's typo in a URL)
    share the label ``_unknown``, so the number of series stays bounded."""

    def __init__(self, models: tuple[str, ...], registry: Any = None):
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Summary

        registry = REGISTRY if registry is None else registry
        self.queue_depth = Gauge("suite_queue_depth", "Requests waiting for a session run, per model",
                                 ["model"], multiprocess_mode="livesum", registry=registry)
        self.batch_size = Histogram("suite_batch_size", "Rows per session run, per model", ["model"],
                                    buckets=BATCH_BUCKETS, registry=registry)
        self.inference_seconds = Histogram("suite_inference_seconds", "Seconds per session run, per model",
                                           ["model"], buckets=SECONDS_BUCKETS, registry=registry)
        self.requests = Counter("suite_requests", "Requests answered, per model, protocol and status",
                                ["model", "protocol", "status"], registry=registry)
        self.request_seconds = Histogram("suite_request_seconds", "Seconds from request to response, per model and protocol",
                                         ["model", "protocol"], buckets=SECONDS_BUCKETS, registry=registry)
        # Text generation (the text engine).
        self.time_to_first_token = Histogram("suite_time_to_first_token_seconds",
                                             "Seconds from a text request's arrival to its first token, per model",
                                             ["model"], buckets=SECONDS_BUCKETS, registry=registry)
        self.time_per_output_token = Histogram("suite_time_per_output_token_seconds",
                                               "Seconds per generated token after the first, per finished request",
                                               ["model"], buckets=SECONDS_BUCKETS, registry=registry)
        self.generated_tokens = Counter("suite_generated_tokens", "Tokens generated, per model", ["model"],
                                        registry=registry)
        self.text_sequences = Gauge("suite_text_sequences", "Text requests decoding (live) or waiting for a row",
                                    ["model", "state"], multiprocess_mode="livesum", registry=registry)
        self.batch_occupancy = Histogram("suite_text_batch_occupancy",
                                         "Live sequences per decoding step as a fraction of text_max_live",
                                         ["model"], buckets=OCCUPANCY_BUCKETS, registry=registry)
        # Rollouts (services/rollout.py): the split, and the shadow comparisons (mean = _sum / _count).
        self.rollout_requests = Counter("suite_rollout_requests", "Requests of a model under rollout, per arm "
                                        "(shadow: answered by the primary, also run on the candidate)",
                                        ["model", "arm"], registry=registry)
        self.shadow_measure = Summary("suite_shadow_measure", "A shadow run's candidate answer against the "
                                      "primary's, in the task's measure", ["model", "candidate", "measure"],
                                      registry=registry)
        self.shadow_skipped_runs = Counter("suite_shadow_skipped", "Shadow runs not compared, per reason",
                                           ["model", "reason"], registry=registry)
        # Payload logging and drift (services/payload_log.py).
        self.ood_scores = Histogram("suite_ood_score", "Out-of-distribution score of each answered input, per model",
                                    ["model"], buckets=OOD_BUCKETS, registry=registry)
        self.class_psi_gauge = Gauge("suite_class_psi", "Population stability index of the predicted classes over "
                                     "a worker's last 2,000 answers against the training distribution (the "
                                     "highest of the workers')", ["model"], multiprocess_mode="livemax",
                                     registry=registry)
        self.payload_log_dropped = Counter("suite_payload_log_dropped", "Payload records dropped because the "
                                           "writer was behind", registry=registry)
        self._models = set(models)
        self._request_children: dict[tuple[str, str, int], Any] = {}
        self._latency_children: dict[tuple[str, str], Any] = {}
        self._ood_children: dict[str, Any] = {}
        self._arm_children: dict[tuple[str, str], Any] = {}

    def observer(self, model: str) -> "ModelObserver":
        self._models.add(model)  # a model found after start-up (an import) is counted under its own name
        return ModelObserver(self, model)

    def request(self, model: str, protocol: str, status: int, seconds: float | None = None) -> None:
        if model not in self._models:
            model = "_unknown"
        key = (model, protocol, status)
        child = self._request_children.get(key)
        if child is None:  # label lookups cost more than the increment: keep the children
            child = self._request_children[key] = self.requests.labels(model, protocol, str(status))
        child.inc()
        if seconds is not None:
            latency = self._latency_children.get(key[:2])
            if latency is None:
                latency = self._latency_children[key[:2]] = self.request_seconds.labels(model, protocol)
            latency.observe(seconds)


    def rollout_request(self, model: str, arm: str) -> None:
        child = self._arm_children.get((model, arm))
        if child is None:
            child = self._arm_children[(model, arm)] = self.rollout_requests.labels(model, arm)
        child.inc()

    def shadow_compared(self, model: str, candidate: str, measure: str, value: float) -> None:
        self.shadow_measure.labels(model, candidate, measure).observe(value)

    def shadow_skipped(self, model: str, reason: str) -> None:
        self.shadow_skipped_runs.labels(model, reason).inc()


    def ood_score(self, model: str, score: float) -> None:
        child = self._ood_children.get(model)
        if child is None:
            child = self._ood_children[model] = self.ood_scores.labels(model)
        child.observe(score)

    def class_psi(self, model: str, psi: float) -> None:
        self.class_psi_gauge.labels(model).set(psi)

    def payload_dropped(self) -> None:
        self.payload_log_dropped.inc()


def exposition() -> tuple[bytes, str]:
    """The Prometheus text page of every worker's metrics (BentoML runs workers in prometheus_client's
    multiprocess mode and sets PROMETHEUS_MULTIPROC_DIR for them)."""
    import os

    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST


class ModelObserver:
    """What a batcher or the text engine reports for one model (labels resolved once)."""

    def __init__(self, metrics: ServingMetrics, model: str):
        self._depth = metrics.queue_depth.labels(model)
        self._batch = metrics.batch_size.labels(model)
        self._seconds = metrics.inference_seconds.labels(model)
        self._ttft = metrics.time_to_first_token.labels(model)
        self._tpot = metrics.time_per_output_token.labels(model)
        self._tokens = metrics.generated_tokens.labels(model)
        self._live = metrics.text_sequences.labels(model, "live")
        self._waiting = metrics.text_sequences.labels(model, "waiting")
        self._occupancy = metrics.batch_occupancy.labels(model)

    def queued(self, depth: int) -> None:
        self._depth.set(depth)

    def ran(self, rows: int, seconds: float) -> None:
        self._batch.observe(rows)
        self._seconds.observe(seconds)

    def sequences(self, live: int, waiting: int) -> None:
        self._live.set(live)
        self._waiting.set(waiting)

    def occupancy(self, fraction: float) -> None:
        self._occupancy.observe(fraction)

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def finished(self, tokens: int, seconds_per_token: float | None) -> None:
        self._tokens.inc(tokens)
        if seconds_per_token is not None:
            self._tpot.observe(seconds_per_token)
