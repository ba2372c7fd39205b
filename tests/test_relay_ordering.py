"""Relays in many processes publish each order's events in order (SPEC §12)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from api.configs import Settings
from api.database.connection import create_engine, create_sessionmaker, raw_connection
from api.database.query import outbox as outbox_queries
from api.events import EventType, order_event
from api.helpers.enums import OrderStatus
from api.models import OutboxEvent
from api.rabbit_core.client import RabbitClient
from api.relay import OutboxRelay
from api.schemas.orders import OrderRead
from tests.event_helpers import (
    insert_backlog,
    observe_events,
    running_relay,
    scratch_events_environment,
    unsent_count,
)

ORDERS = 1000
EVENTS_PER_ORDER = 10


def _order(order_id: uuid.UUID, version: int, now: datetime) -> OrderRead:
    return OrderRead(
        id=order_id,
        user_id=uuid.UUID(int=1),
        status=OrderStatus.PENDING,
        currency="EUR",
        items=[{"sku": "S", "name": "W", "quantity": 1, "unit_price": 100, "line_total": 100}],
        total_amount=100,
        metadata={},
        version=version,
        created_at=now,
        updated_at=now,
    )


async def insert_interleaved_backlog(
    sessionmaker: async_sessionmaker[AsyncSession], *, orders: int, per_order: int
) -> set[str]:
    """`orders` x `per_order` unsent events, each order's in version order, orders interleaved
    differently in every round (as concurrent requests would write them)."""
    now = datetime.now(UTC)
    order_ids = [uuid.uuid4() for _ in range(orders)]
    rows = []
    for version in range(1, per_order + 1):
        random.shuffle(order_ids)
        for order_id in order_ids:
            event = order_event(
                _order(order_id, version, now), event_type=EventType.CREATED, request_id=None
            )
            rows.append(
                {
                    "event_id": event.event_id,
                    "routing_key": event.routing_key,
                    "body": event.body,
                    "correlation_id": event.correlation_id,
                    "order_id": order_id,
                }
            )
    for start in range(0, len(rows), 2000):
        async with sessionmaker() as session, session.begin():
            await session.execute(insert(OutboxEvent), rows[start : start + 2000])
    return {str(row["event_id"]) for row in rows}


async def test_two_relays_draining_a_backlog_publish_every_order_in_version_order(
    settings: Settings,
) -> None:
    async with scratch_events_environment(settings) as scratch:
        engine = create_engine(scratch)
        try:
            expected = await insert_interleaved_backlog(
                create_sessionmaker(engine), orders=ORDERS, per_order=EVENTS_PER_ORDER
            )
            async with observe_events(scratch) as observer, contextlib.AsyncExitStack() as stack:
                # Small batches: many claims, so the two relays interleave all through.
                relays = [
                    (
                        await stack.enter_async_context(
                            running_relay(scratch, OUTBOX_BATCH_SIZE=100)
                        )
                    )[0]
                    for _ in range(2)
                ]
                await observer.wait_for(
                    lambda seen: {m.message_id for m in seen.messages} >= expected, timeout=120
                )
                # The last batches are counted once their transaction commits.
                deadline = time.monotonic() + 30
                while await unsent_count(create_sessionmaker(engine)):
                    assert time.monotonic() < deadline, "rows left unsent"
                    await asyncio.sleep(0.05)
                published = [relay.published for relay in relays]
        finally:
            await engine.dispose()

    versions: dict[str, list[int]] = {}
    for body in observer.bodies():
        versions.setdefault(body["subject"], []).append(body["data"]["version"])
    inversions = sum(
        1
        for seen in versions.values()
        for index in range(1, len(seen))
        if seen[index] < max(seen[:index])
    )
    assert len(versions) == ORDERS
    assert inversions == 0
    # Both relays did a share of the work (or the test would show nothing about two).
    assert all(count > 0 for count in published), published
    assert sum(published) == ORDERS * EVENTS_PER_ORDER


async def test_a_relay_started_with_its_client_waits_for_the_connection_instead_of_warning(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A healthy start (relay and client started together, as every process does) logs no
    'cannot publish' warning: the relay waits for the first connection."""
    async with scratch_events_environment(settings) as scratch:
        engine = create_engine(scratch)
        sessionmaker = create_sessionmaker(engine)
        rabbit = RabbitClient(scratch)
        relay = OutboxRelay(scratch, sessionmaker, rabbit)
        try:
            with caplog.at_level(logging.WARNING):
                await insert_backlog(sessionmaker, 5)
                await rabbit.start()
                await relay.start()
                deadline = time.monotonic() + 20
                while await unsent_count(sessionmaker):
                    assert time.monotonic() < deadline, "the backlog was not published"
                    await asyncio.sleep(0.05)
                await relay.stop()
        finally:
            await rabbit.close()
            await engine.dispose()
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("api.")]
    assert warnings == []


async def test_a_backlog_drains_in_short_batches_without_waiting_for_the_poll_interval(
    settings: Settings,
) -> None:
    """A claim holds at most 16 of the 64 order partitions, so most batches of a backlog
    come back short of OUTBOX_BATCH_SIZE; the relay claims again at once while rows are
    left, instead of taking a short batch for the end and sleeping the poll interval."""
    async with scratch_events_environment(settings) as scratch:
        engine = create_engine(scratch)
        sessionmaker = create_sessionmaker(engine)
        try:
            # Written before the relay listens: no NOTIFY will wake it.
            expected = await insert_backlog(sessionmaker, 3000)
            async with (
                observe_events(scratch) as observer,
                running_relay(scratch, OUTBOX_BATCH_SIZE=100, OUTBOX_POLL_INTERVAL=60) as (
                    relay,
                    _,
                ),
            ):
                # Well inside one poll interval: a single sleep of the old loop fails this.
                await observer.wait_for(
                    lambda seen: {m.message_id for m in seen.messages} >= expected, timeout=30
                )
                published = relay.published
        finally:
            await engine.dispose()
    assert published >= 3000


def _plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Every node of an EXPLAIN (ANALYZE, FORMAT JSON) plan."""
    return [plan] + [node for child in plan.get("Plans", ()) for node in _plan_nodes(child)]


async def test_a_claim_reads_at_most_its_scan_of_a_backlog_on_a_never_analysed_outbox(
    engine: AsyncEngine,
) -> None:
    """Without statistics (autovacuum off, a new install) the planner's own choices read
    the whole backlog on every claim (a bitmap or sequential scan) or ran a nested loop
    over the CTEs (678 ms for 100 rows); the claim's statement and settings keep it to
    one ordered walk of the unsent rows, stopping at the claim's scan."""
    limit = 100
    scan = limit * outbox_queries.OUTBOX_PARTITIONS // outbox_queries.MAX_PARTITIONS_PER_CLAIM
    async with raw_connection(engine) as connection:
        transaction = connection.transaction()
        await transaction.start()
        try:
            # A temporary `outbox` comes first on the search path: a table never analysed
            # (nor vacuumed), whoever ran what on the real one; gone with the rollback.
            await connection.execute(
                "CREATE TEMPORARY TABLE outbox (LIKE public.outbox INCLUDING ALL) ON COMMIT DROP"
            )
            await connection.execute(
                "INSERT INTO outbox (event_id, routing_key, body, order_id) "
                "SELECT gen_random_uuid(), 'order.created', '{}', gen_random_uuid() "
                "FROM generate_series(1, $1::int)",
                3 * scan,
            )
            await connection.execute(outbox_queries._CLAIM_SETTINGS)
            explained = await connection.fetchval(
                "EXPLAIN (ANALYZE, FORMAT JSON) " + outbox_queries._CLAIM,
                outbox_queries.OUTBOX_PARTITIONS - 1,
                scan,
                outbox_queries.PARTITION_LOCK_NAMESPACE,
                outbox_queries.MAX_PARTITIONS_PER_CLAIM,
                limit,
            )
        finally:
            await transaction.rollback()
    # EXPLAIN's json comes decoded (the engine installs the JSON codecs).
    nodes = _plan_nodes(explained[0]["Plan"])
    read = [
        (
            node["Node Type"],
            node["Actual Loops"] * (node["Actual Rows"] + node.get("Rows Removed by Filter", 0)),
        )
        for node in nodes
        if node.get("Relation Name") == "outbox"
    ]
    assert read
    assert max(rows for _, rows in read) <= scan, read
    assert max(node["Actual Loops"] for node in nodes) <= scan
