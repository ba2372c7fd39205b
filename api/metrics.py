"""Prometheus metrics; multiprocess-aware when PROMETHEUS_MULTIPROC_DIR is set."""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

HTTP_REQUESTS = Counter(
    "http_requests_total",
    "HTTP requests by method, route template and status.",
    ["method", "route", "status"],
)
HTTP_LATENCY = Histogram(
    "http_request_duration_seconds",
    "HTTP request latency by method and route template.",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
RATE_LIMIT_DECISIONS = Counter(
    "rate_limit_decisions_total",
    "Rate-limit decisions by policy, decision and backend (redis or memory).",
    ["policy", "decision", "backend"],
)
RATE_LIMIT_FALLBACKS = Counter(
    "rate_limit_fallback_total",
    "Times the limiter fell back to in-process buckets because Redis was unreachable.",
)
CACHE_LOOKUPS = Counter(
    "cache_lookups_total",
    "Response cache lookups by result (hit, miss, bypass).",
    ["result"],
)
OUTBOX_BACKLOG = Gauge(
    "outbox_backlog",
    "Outbox events not yet confirmed by RabbitMQ (last value seen by a relay).",
    multiprocess_mode="mostrecent",
)
OUTBOX_PUBLISHED = Counter(
    "outbox_published_total", "Outbox events published and confirmed by RabbitMQ."
)
OUTBOX_FAILED = Counter(
    "outbox_publish_failures_total", "Outbox publish attempts that failed and will be retried."
)
STATUS_MESSAGES = Counter(
    "status_messages_total",
    "Status-queue messages by outcome (applied, noop, dead_lettered).",
    ["outcome"],
)


def render_metrics() -> tuple[bytes, str]:
    """The exposition text of this process, or of all workers in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
