"""What a process can see of its dependencies and its backlog, for `/readyz` and `/metrics`.

Readiness and the gauges a scrape refreshes are measured by the same probes, so a
dashboard and a load balancer never disagree about what is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from api.database.connection import connected_node
from api.database.query.outbox import outbox_backlog_stats
from api.database.query.server import ping
from api.metrics import DEAD_LETTERED, DEPENDENCY_READY, OUTBOX_BACKLOG, OUTBOX_OLDEST_AGE
from api.rabbit_core.client import RabbitClient
from api.redis_core.circuit import describe
from api.relay.notifications import listen_state
from api.state import AppState

PROBE_TIMEOUT = 1.0

Status = Literal["pass", "warn", "fail"]
Check = dict[str, Any]


async def probe(check: Callable[[], Awaitable[Check | None]]) -> Check:
    """`{status, latency_ms[, detail]}` of one check, bounded by PROBE_TIMEOUT, with what
    a passing check adds (the node it reached, say)."""
    started = time.perf_counter()
    extra: Check | None = None
    try:
        extra = await asyncio.wait_for(check(), PROBE_TIMEOUT)
    except TimeoutError:
        outcome: Check = {"status": "fail", "detail": f"no answer within {PROBE_TIMEOUT}s"}
    except Exception as exc:  # a probe reports any failure instead of raising it
        outcome = {"status": "fail", "detail": describe(exc)}
    else:
        outcome = {"status": "pass", **(extra or {})}
    outcome["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
    return outcome


async def check_dependencies(state: AppState) -> tuple[Status, dict[str, Check]]:
    """The overall status and one probe per dependency, run together; also sets the
    `dependency_ready` gauges.

    PostgreSQL down fails the process; Redis or RabbitMQ down only degrades it. RabbitMQ
    refusing the queues' arguments is a misconfiguration, not an outage: nothing will
    flow until an operator fixes it, so it fails the process too (SPEC §12).
    """

    async def postgres() -> Check:
        async with state["engine"].connect() as conn:
            await ping(conn)
            raw = await conn.get_raw_connection()
            # The node of POSTGRES_HOSTS (or the pooler) this process writes to, and whether
            # its relay is woken by LISTEN or (degraded) only polls.
            extra: Check = {"host": str(connected_node(raw.driver_connection))}
            if (listen := listen_state()) is not None:
                extra["relay_wakeup"] = listen
            return extra

    async def redis() -> None:
        # What every request does (the limiter's script on a key's slot), not a PING of
        # whichever node answers first.
        await state["limiter"].probe()

    async def rabbitmq() -> None:
        if not state["rabbit"].is_connected:
            raise ConnectionError("not connected")

    pg, rd, mq = await asyncio.gather(probe(postgres), probe(redis), probe(rabbitmq))
    fault = state["limiter"].circuit.current_fault
    if rd["status"] == "pass" and fault is not None:
        # Redis answers, but a call of the service's failed with an error that is not an
        # outage (WRONGTYPE, CROSSSLOT, NOPERM...): served without Redis meanwhile.
        rd["status"] = "warn"
        rd["detail"] = fault
    rabbit = state["rabbit"]
    if rabbit.node is not None:
        mq["node"] = rabbit.node
    if rabbit.misconfiguration is not None:
        mq["status"] = "fail"
        mq["detail"] = f"topology refused: {rabbit.misconfiguration}"
    checks = {"postgres": pg, "redis": rd, "rabbitmq": mq}
    for name, check in checks.items():
        DEPENDENCY_READY.labels(name).set(1 if check["status"] == "pass" else 0)
    status: Status = "pass"
    if any(check["status"] != "pass" for check in checks.values()):
        status = "warn"
    if pg["status"] == "fail" or rabbit.misconfiguration is not None:
        status = "fail"
    return status, checks


async def _refresh_outbox(engine: AsyncEngine) -> None:
    async with AsyncSession(engine) as session:
        count, oldest = await outbox_backlog_stats(session)
    OUTBOX_BACKLOG.set(count)
    age = (datetime.now(UTC) - oldest).total_seconds() if oldest is not None else 0.0
    OUTBOX_OLDEST_AGE.set(max(age, 0.0))


async def _refresh_dead_letters(rabbit: RabbitClient) -> None:
    names = rabbit.names
    channel = await rabbit.channel(publisher_confirms=False)
    try:
        for queue in (names.queue, names.status_queue):
            dlq = names.dead_letter_queue(queue)
            declared = await channel.declare_queue(dlq, passive=True)
            DEAD_LETTERED.labels(dlq).set(declared.declaration_result.message_count or 0)
    finally:
        with contextlib.suppress(Exception):
            await channel.close()


async def refresh_scrape_gauges(state: AppState) -> None:
    """Before a scrape: readiness, outbox backlog and age, dead-letter depths.

    Each part is bounded like a probe; one that cannot be measured keeps its last value
    (and its dependency shows 0 in `dependency_ready`).
    """
    await asyncio.gather(
        check_dependencies(state),
        probe(lambda: _refresh_outbox(state["engine"])),
        probe(lambda: _refresh_dead_letters(state["rabbit"])),
    )
