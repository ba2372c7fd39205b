"""OpenTelemetry tracing, configured only by the standard `OTEL_*` variables (SPEC §14).

On when `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set
(and `OTEL_SDK_DISABLED` is not `true`): spans for HTTP requests, asyncpg statements,
Redis calls, outbox publishes and status messages are exported over OTLP/HTTP, with
the sampler of `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`. Off, the SDK is not
even imported: no provider, no exporter thread, no middleware, and each helper below
costs one flag test.

The trace of an order change crosses the outbox: `trace_headers()` captures the W3C
context of the request (or status message) that writes an event, the outbox row keeps
it, and the relay's publish span continues it (`publish_span`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.sdk.trace import TracerProvider

DEFAULT_SERVICE_NAME = "orders-api"
# The standard variables a deployment sets for us (the SDK reads them itself).
OTEL_VARIABLES = frozenset(
    {
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_HEADERS",
        "OTEL_SERVICE_NAME",
        "OTEL_RESOURCE_ATTRIBUTES",
        "OTEL_TRACES_SAMPLER",
        "OTEL_TRACES_SAMPLER_ARG",
        "OTEL_SDK_DISABLED",
    }
)
# Probes and scrapes would be most of the spans and tell nothing about an order.
EXCLUDED_URLS = "/ping,/livez,/readyz,/metrics"

_provider: TracerProvider | None = None


def tracing_configured(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment asks for tracing (an OTLP endpoint, SDK not disabled)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    )


def tracing_enabled() -> bool:
    return _provider is not None


def setup_tracing() -> bool:
    """Install the SDK and the asyncpg and Redis instrumentations once per process."""
    global _provider
    if _provider is not None:
        return True
    if not tracing_configured():
        return False
    # Imported here: with tracing off the SDK and the instrumentations never load.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: DEFAULT_SERVICE_NAME}
    provider = TracerProvider(resource=Resource.create(attributes))  # sampler from OTEL_*
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    AsyncPGInstrumentor().instrument(tracer_provider=provider)  # type: ignore[no-untyped-call]
    RedisInstrumentor().instrument(tracer_provider=provider)
    _provider = provider
    return True


def instrument_app(app: FastAPI) -> None:
    """HTTP server spans named by route template (no headers, bodies or tokens recorded)."""
    if _provider is None:
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=_provider,
        excluded_urls=EXCLUDED_URLS,
        exclude_spans=["receive", "send"],
    )


def shutdown_tracing() -> None:
    """Export what is buffered; called when a process stops."""
    if _provider is not None:
        _provider.force_flush(timeout_millis=5000)


def trace_headers() -> dict[str, str]:
    """The current context as W3C `traceparent` (and `tracestate`); empty when off or none."""
    if _provider is None:
        return {}
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def current_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) in hex of the active span, for log lines; None outside a span."""
    if _provider is None:
        return None
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


def _tracer() -> trace.Tracer:
    return trace.get_tracer("orders-api")


@contextlib.contextmanager
def publish_span(
    carrier: Mapping[str, Any] | None, *, destination: str, routing_key: str, message_id: str
) -> Iterator[dict[str, str]]:
    """A PRODUCER span continuing `carrier` (the writer's context kept in the outbox).

    Yields the headers to put on the AMQP message: the publish span's `traceparent`
    (and `tracestate`). Yields nothing when tracing is off.
    """
    if _provider is None:
        yield {}
        return
    parent = propagate.extract(dict(carrier)) if carrier else None
    with _tracer().start_as_current_span(
        f"publish {destination}",
        context=parent,
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": "rabbitmq",
            "messaging.operation.type": "publish",
            "messaging.destination.name": destination,
            "messaging.rabbitmq.destination.routing_key": routing_key,
            "messaging.message.id": message_id,
        },
    ):
        yield trace_headers()


@contextlib.contextmanager
def consume_span(
    headers: Mapping[str, Any] | None, *, source: str, message_id: str | None
) -> Iterator[None]:
    """A CONSUMER span continuing the message's `traceparent`; what it writes carries it on."""
    if _provider is None:
        yield
        return
    carrier = {k: str(v) for k, v in (headers or {}).items() if k in ("traceparent", "tracestate")}
    attributes = {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "process",
        "messaging.destination.name": source,
    }
    if message_id:
        attributes["messaging.message.id"] = message_id
    with _tracer().start_as_current_span(
        f"process {source}",
        context=propagate.extract(carrier),
        kind=SpanKind.CONSUMER,
        attributes=attributes,
    ):
        yield
