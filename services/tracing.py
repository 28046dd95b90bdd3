"""OpenTelemetry spans: request -> queue -> batch -> session run.

Off unless the ``tracing`` setting is on; then each worker builds its own tracer provider (not the
global one, which BentoML owns) with a batch span processor and the exporter the standard
environment names: ``OTEL_TRACES_EXPORTER`` (``otlp``, the default; ``console``; ``none``), and for
OTLP over HTTP ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``,
``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_SERVICE_NAME``, and the sampler (``OTEL_TRACES_SAMPLER``,
``OTEL_TRACES_SAMPLER_ARG``), all read by the SDK itself. A request carrying a W3C ``traceparent``
header continues the caller's trace.

- ``request``: one per HTTP request or gRPC call, named by its route (``POST /classify``), with the
  model, protocol and status;
- ``queue``: a request's wait in its model's dynamic batcher, from submission to its batch's start;
- ``batch``: one session run's batch: a child of its first request's queue span and linked to every
  request's, with the rows and requests it holds;
- ``session run``: ONNX Runtime's run of that batch (in the batcher's thread).

When off, every instrumentation point costs one check of a module global."""

from __future__ import annotations

import os
from typing import Any

_tracer: Any = None  # the tracer when tracing is on, else None (what the hot paths check)
_provider: Any = None


def configure(service_name: str = "model-suite", exporter: Any = None, simple: bool = False) -> None:
    """Turns tracing on in this process: ``exporter`` (tests: an in-memory one), else the one the
    environment names. ``simple``: export each span as it ends (tests), not in batches."""
    global _tracer, _provider
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    if exporter is None:
        exporter = exporter_from_environment()
    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME",
                                                                                      service_name)}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter) if simple else BatchSpanProcessor(exporter))
    _provider = provider
    _tracer = provider.get_tracer("model-suite")


def exporter_from_environment() -> Any:
    kind = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    if kind == "none":
        return None
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if kind != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER={kind!r}: this server exports otlp (over HTTP), console or none")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def shutdown() -> None:
    """Exports what is buffered (a worker stopping)."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


def tracer() -> Any:
    return _tracer


def request_span(name: str, headers: Any, attributes: dict) -> Any:
    """A ``request`` span continuing the caller's trace (``traceparent`` in ``headers``), as a
    context manager that makes it current."""
    from opentelemetry.propagate import extract
    from opentelemetry.trace import SpanKind

    return _tracer.start_as_current_span(name, context=extract(headers), kind=SpanKind.SERVER,
                                         attributes=attributes)


def start_queue_span(model: str, rows: int) -> Any:
    return _tracer.start_span("queue", attributes={"model": model, "rows": rows})


def start_batch_span(model: str, queue_spans: list, rows: int) -> Any:
    """The batch: ends its requests' queue spans, is the first one's child and links to all."""
    from opentelemetry.trace import Link, set_span_in_context

    for span in queue_spans:
        span.end()
    return _tracer.start_span("batch", context=set_span_in_context(queue_spans[0]),
                              links=[Link(span.get_span_context()) for span in queue_spans],
                              attributes={"model": model, "rows": rows, "requests": len(queue_spans)})


def traced_run(run, feeds, batch_span) -> Any:
    """``run(feeds)`` inside a ``session run`` span under ``batch_span`` (in the batcher's thread)."""
    from opentelemetry.trace import set_span_in_context

    with _tracer.start_as_current_span("session run", context=set_span_in_context(batch_span)):
        return run(feeds)
