"""The dashboard and the alert rules: valid for promtool, and about metrics the service serves."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aio_pika
import httpx
import yaml
from asgi_lifespan import LifespanManager
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from api.configs import Settings
from api.database.connection import create_engine, create_sessionmaker
from api.main import create_app
from api.models import OutboxEvent
from tests.event_helpers import insert_raw_outbox_event, scratch_events_environment

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "deploy/prometheus/alerts.yml"
ALERT_TESTS = ROOT / "deploy/prometheus/alerts.test.yml"
DASHBOARD = ROOT / "deploy/grafana/orders-api.json"


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ROOT / "scripts/promtool.sh"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _queries() -> Iterator[str]:
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            yield rule["expr"]
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel["targets"]:
            yield target["expr"]


def metric_names(query: str) -> set[str]:
    """The metric names a PromQL query reads: identifiers outside `{…}`, `by (…)` and
    `without (…)` that are neither called as functions nor keywords."""
    stripped = re.sub(r"\{[^}]*\}", "", query)
    stripped = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", stripped
    )
    stripped = re.sub(r"\[[^\]]*\]", "", stripped)
    names = set()
    for match in re.finditer(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b\s*(\()?", stripped):
        name, called = match.group(1), match.group(2)
        if called or "_" not in name or name.startswith("$"):
            continue
        names.add(name)
    return names


# The sample names a family of each type serves, whether or not it has samples yet.
_SAMPLE_NAMES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_count", "_sum"),
    "gauge": ("",),
}


def served_names(families: list[Metric]) -> set[str]:
    return {
        family.name + suffix
        for family in families
        for suffix in _SAMPLE_NAMES.get(family.type, ("",))
    }


def test_metric_name_extraction_reads_only_metrics() -> None:
    query = (
        "histogram_quantile(0.99, sum by (le, route) (rate(http_request_duration_seconds_bucket"
        '{route!="/x",status_code="5"}[5m]))) / max(outbox_backlog) and on (job) dependency_ready'
    )
    assert metric_names(query) == {
        "http_request_duration_seconds_bucket",
        "outbox_backlog",
        "dependency_ready",
    }


def test_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    checked = _promtool("check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = _promtool("test", "rules", str(ALERT_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_dashboard_is_a_grafana_dashboard_with_a_query_per_panel() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "orders-api"
    titles = [panel["title"] for panel in dashboard["panels"]]
    assert len(titles) == len(set(titles))
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        assert all(target["expr"].strip() for target in panel["targets"])


async def test_every_metric_of_the_rules_and_dashboard_is_on_metrics(settings: Settings) -> None:
    """Scraped from a live app whose gauges say something: an event waiting ten minutes
    (relay off), a dead-lettered status message, all three dependencies reachable."""
    async with scratch_events_environment(settings) as scratch:
        scratch = scratch.model_copy(update={"OUTBOX_RELAY_ENABLED": False})
        engine = create_engine(scratch)
        sessionmaker = create_sessionmaker(engine)
        try:
            event_id = await insert_raw_outbox_event(sessionmaker, routing_key="order.created")
            async with sessionmaker() as session, session.begin():
                await session.execute(
                    update(OutboxEvent)
                    .where(OutboxEvent.event_id == event_id)
                    .values(created_at=datetime.now(UTC) - timedelta(minutes=10))
                )
            app = create_app(scratch)
            async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager:
                await manager._state["rabbit"].wait_connected(timeout=30)
                connection = await aio_pika.connect(scratch.rabbitmq_url, timeout=10)
                async with connection:
                    channel = await connection.channel()
                    await channel.default_exchange.publish(
                        aio_pika.Message(b"not json", message_id="observability-poison"),
                        routing_key=scratch.RMQ_STATUS_QUEUE,
                    )
                transport = httpx.ASGITransport(app=manager.app)
                async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                    await client.get("/v1/orders")  # a request, so the HTTP families have samples
                    families = await _scrape_until_dead_lettered(client, scratch)
        finally:
            await engine.dispose()

    exposed = served_names(families)
    queried = set().union(*(metric_names(query) for query in _queries()))
    assert queried, "no metric found in the rules and the dashboard"
    missing = sorted(name for name in queried if name not in exposed)
    assert not missing, f"named in the rules or the dashboard but not on /metrics: {missing}"

    samples = [sample for family in families for sample in family.samples]
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in samples}
    for dependency in ("postgres", "redis", "rabbitmq"):
        assert values[("dependency_ready", (("dependency", dependency),))] == 1.0
    assert values[("outbox_backlog", ())] == 1.0
    assert 590 < values[("outbox_oldest_unsent_age_seconds", ())] < 3600


async def _scrape_until_dead_lettered(
    client: httpx.AsyncClient, settings: Settings
) -> list[Metric]:
    dlq = f"{settings.RMQ_STATUS_QUEUE}.dlq"
    for _ in range(100):
        response = await client.get("/metrics")
        assert response.status_code == 200
        families = list(text_string_to_metric_families(response.text))
        samples = [sample for family in families for sample in family.samples]
        depth = [
            s.value
            for s in samples
            if s.name == "dead_letter_messages" and s.labels == {"queue": dlq}
        ]
        if depth == [1.0]:
            return families
        await asyncio.sleep(0.1)
    raise AssertionError(f"{dlq} never showed one message in dead_letter_messages")
