"""Prometheus metrics; multiprocess-aware when PROMETHEUS_MULTIPROC_DIR is set."""

from __future__ import annotations

import os
from functools import lru_cache

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

# In multiprocess mode each update asks os.getpid() (prometheus-client notices a fork
# that way): ~0.25 us, under 1 % of a request's CPU and not visible in an A/B under wrk,
# so the library's own value class is used as it comes.
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
REDIS_ERRORS = Counter(
    "redis_errors_total",
    "Failed Redis calls by kind: outage, or the error that is not one (WRONGTYPE, CROSSSLOT, "
    "READONLY, NOPERM, AUTH, TLS...).",
    ["kind"],
)
CACHE_LOOKUPS = Counter(
    "cache_lookups_total",
    "Response cache lookups by result (hit, miss, bypass).",
    ["result"],
)
OUTBOX_BACKLOG = Gauge(
    "outbox_backlog",
    "Outbox events not yet confirmed by RabbitMQ (at scrape, or as a relay last saw it).",
    multiprocess_mode="mostrecent",
)
OUTBOX_OLDEST_AGE = Gauge(
    "outbox_oldest_unsent_age_seconds",
    "Age of the oldest outbox event not yet confirmed by RabbitMQ (0 when none), at scrape.",
    multiprocess_mode="mostrecent",
)
DEAD_LETTERED = Gauge(
    "dead_letter_messages",
    "Messages waiting in a dead-letter queue, at scrape.",
    ["queue"],
    multiprocess_mode="mostrecent",
)
DEPENDENCY_READY = Gauge(
    "dependency_ready",
    "1 when the dependency's readiness probe passed at the last scrape or probe, else 0.",
    ["dependency"],
    multiprocess_mode="mostrecent",
)
OUTBOX_PUBLISHED = Counter(
    "outbox_published_total", "Outbox events published and confirmed by RabbitMQ."
)
OUTBOX_FAILED = Counter(
    "outbox_publish_failures_total", "Outbox publish attempts that failed and will be retried."
)
OUTBOX_LISTEN_FAILURES = Counter(
    "outbox_listen_failures_total",
    "Times the relay's LISTEN connection to the primary failed; it polls until it is back.",
)
STATUS_MESSAGES = Counter(
    "status_messages_total",
    "Status-queue messages by outcome (applied, noop, dead_lettered).",
    ["outcome"],
)


# The labelled children the request path updates, looked up once per label set:
# `labels()` validates and locks on every call. The label values are bounded (methods
# the HTTP parser accepts, route templates, statuses, policies).
@lru_cache(maxsize=1024)
def http_requests(method: str, route: str, status: int) -> Counter:
    return HTTP_REQUESTS.labels(method, route, str(status))


@lru_cache(maxsize=1024)
def http_latency(method: str, route: str) -> Histogram:
    return HTTP_LATENCY.labels(method, route)


@lru_cache(maxsize=64)
def rate_limit_decisions(policy: str, decision: str, backend: str) -> Counter:
    return RATE_LIMIT_DECISIONS.labels(policy, decision, backend)


@lru_cache(maxsize=64)
def redis_errors(kind: str) -> Counter:
    return REDIS_ERRORS.labels(kind)


@lru_cache(maxsize=8)
def cache_lookups(result: str) -> Counter:
    return CACHE_LOOKUPS.labels(result)


def render_metrics() -> tuple[bytes, str]:
    """The exposition text of this process, or of all workers in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
