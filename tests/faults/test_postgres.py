"""PostgreSQL faults against `python -m api` (2 workers): a restart under load, a slow query."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from api.configs import Settings
from api.helpers.orjson_coder import loads
from tests.event_helpers import observe_events
from tests.factories import TestUser, insert_orders
from tests.faults.conftest import StartService
from tests.faults.helpers import (
    ORDER_BODY,
    Sample,
    assert_unavailable_problem,
    order_count,
    orders_without_event,
    outbox_count,
    report,
    service_backends,
    timed,
)
from tests.faults.service import RunningService, client_port
from tests.services import restart_postgres

pytestmark = pytest.mark.faults

CREATES = 200
CREATE_INTERVAL = 0.05  # ~20 creates per second
RESTART_AFTER = 60  # creates sent before PostgreSQL restarts (~3 s in)
RETRY_PAUSE = 0.2
RECOVERY_BOUND = 5.0


async def _create_until_accepted(
    client: httpx.AsyncClient, user: TestUser, key: str, deadline: float
) -> list[Sample]:
    """A storefront's retry loop: the same Idempotency-Key until a non-503 answer."""
    headers = {**user.headers, "Idempotency-Key": key}
    samples: list[Sample] = []
    while time.monotonic() < deadline:
        sample = await timed(client, "POST", "/v1/orders", json=ORDER_BODY, headers=headers)
        samples.append(sample)
        if sample.status != 503:
            break
        await asyncio.sleep(RETRY_PAUSE)
    return samples


@pytest.mark.timeout(150)
async def test_postgres_restart_during_200_creates_loses_nothing_and_duplicates_nothing(
    start_service: StartService,
    settings: Settings,
    engine: AsyncEngine,
    sessionmaker: async_sessionmaker[AsyncSession],
    user: TestUser,
) -> None:
    async with (
        start_service() as service,
        service.client() as client,
        observe_events(settings, robust=True) as observer,
    ):
        started = time.monotonic()
        deadline = started + 90
        tasks: dict[str, asyncio.Task[list[Sample]]] = {}
        restart: asyncio.Task[tuple[float, float]] | None = None
        for index in range(CREATES):
            if index == RESTART_AFTER:
                restart = asyncio.create_task(restart_postgres())
            key = f"pg-restart-{uuid.uuid4()}"
            tasks[key] = asyncio.create_task(_create_until_accepted(client, user, key, deadline))
            await asyncio.sleep(
                max(0.0, started + (index + 1) * CREATE_INTERVAL - time.monotonic())
            )
        assert restart is not None
        went_down, restart_done = await restart
        results = {key: await task for key, task in tasks.items()}
        # This test process's own pooled connections died with PostgreSQL too.
        await engine.dispose()

        samples = [sample for attempts in results.values() for sample in attempts]
        unavailable = [sample for sample in samples if sample.status == 503]
        # Every answer is a success or a clean 503; nothing else, never a dropped connection.
        assert {sample.status for sample in samples} <= {201, 503}, [
            s for s in samples if s.status not in (201, 503)
        ]
        for sample in unavailable:
            assert_unavailable_problem(sample)
        assert unavailable, "the restart was never seen by a request"
        # Creates succeed again within 5 s of PostgreSQL accepting connections.
        first_success = min(
            s.received for s in samples if s.status == 201 and s.sent >= restart_done
        )
        assert first_success - restart_done < RECOVERY_BOUND
        assert all(s.sent < restart_done + RECOVERY_BOUND for s in unavailable)

        # Each key ends with exactly one order, whatever its retries saw.
        order_ids: dict[str, set[str]] = defaultdict(set)
        for key, attempts in results.items():
            assert attempts[-1].status == 201, (key, attempts[-1])
            for sample in attempts:
                if sample.status == 201:
                    order_ids[key].add(loads(sample.body)["id"])
        assert all(len(ids) == 1 for ids in order_ids.values())
        replayed = sum(
            1 for s in samples if s.headers and s.headers.get("Idempotent-Replayed") == "true"
        )
        created = {next(iter(ids)) for ids in order_ids.values()}
        assert len(created) == CREATES
        assert await order_count(sessionmaker, user.id) == CREATES
        assert await outbox_count(sessionmaker, user.id) == CREATES
        assert await orders_without_event(sessionmaker, user.id) == 0

        # And every one of those events reaches the exchange: none lost to the restart.
        await observer.wait_for(
            lambda seen: created <= {loads(m.body)["subject"] for m in seen.messages}, timeout=60
        )
    report(
        f"pg stop/start: {len(samples)} requests, {len(unavailable)} answered 503, "
        f"down {restart_done - went_down:.2f}s, first 201 "
        f"{first_success - restart_done:.2f}s after it, orders={CREATES}, events={len(created)}"
        f", max latency {max(s.latency for s in samples):.2f}s, replayed {replayed}"
    )


# --- a query past POSTGRES_TRANSACTION_TIMEOUT --------------------------------------------

TRANSACTION_TIMEOUT = 1.0
POOL_SIZE = 3


async def _clients_per_worker(service: RunningService, per_worker: int) -> list[httpx.AsyncClient]:
    """`per_worker` single-connection clients pinned (by keep-alive) to each worker."""
    by_worker: dict[int, list[httpx.AsyncClient]] = defaultdict(list)
    spare: list[httpx.AsyncClient] = []
    try:
        for _ in range(60):
            if len(by_worker) == 2 and all(len(c) >= per_worker for c in by_worker.values()):
                break
            client = service.client(limits=httpx.Limits(max_connections=1))
            response = await client.get("/ping")
            worker = service.worker_of(client_port(response))
            assert worker is not None
            (by_worker[worker] if len(by_worker[worker]) < per_worker else spare).append(client)
        assert len(by_worker) == 2, "both workers should have taken connections"
    finally:
        for client in spare:
            await client.aclose()
    return [client for clients in by_worker.values() for client in clients[:per_worker]]


async def _waiting_on_locks(
    sessionmaker: async_sessionmaker[AsyncSession], service: RunningService, want: int
) -> int:
    """Service sessions waiting on a row lock, polled until `want` or ~0.6 s."""
    seen = 0
    for _ in range(30):
        backends = await service_backends(sessionmaker, service)
        seen = sum(1 for b in backends if b["wait_event_type"] == "Lock")
        if seen >= want:
            break
        await asyncio.sleep(0.02)
    return seen


@pytest.mark.timeout(90)
async def test_queries_past_the_transaction_timeout_are_503_in_every_worker_and_the_pools_recover(
    start_service: StartService,
    settings: Settings,
    sessionmaker: async_sessionmaker[AsyncSession],
    user: TestUser,
) -> None:
    """Each worker's whole pool blocks on a held row lock: 503 in time, then the pool is whole."""
    capacity = POOL_SIZE * 2
    async with start_service(
        POSTGRES_TRANSACTION_TIMEOUT=TRANSACTION_TIMEOUT,
        POSTGRES_POOL_SIZE=POOL_SIZE,
        POSTGRES_MAX_OVERFLOW=0,
        OUTBOX_RELAY_ENABLED="false",  # its sessions would share the pools under test
        STATUS_CONSUMER_ENABLED="false",
    ) as service:
        clients = await _clients_per_worker(service, POOL_SIZE)
        try:
            order_ids = await insert_orders(sessionmaker, user.id, capacity)

            async def cancel_all() -> list[Sample]:
                return await asyncio.gather(
                    *(
                        timed(c, "POST", f"/v1/orders/{o}/cancel", headers=user.headers)
                        for c, o in zip(clients, order_ids, strict=True)
                    )
                )

            # Every pooled connection of both workers waits on a row this test holds.
            async with sessionmaker() as session, session.begin():
                await session.execute(
                    text("SELECT 1 FROM orders WHERE id = ANY(:ids) FOR UPDATE"), {"ids": order_ids}
                )
                blocked = asyncio.create_task(cancel_all())
                exhausted = await _waiting_on_locks(sessionmaker, service, capacity)
                timed_out = await blocked
            assert exhausted == capacity
            for sample in timed_out:
                assert_unavailable_problem(sample)
                assert sample.latency < TRANSACTION_TIMEOUT + 1.0

            # Recovered: the same connections, so the same workers, hold a full pool at once.
            async with sessionmaker() as session, session.begin():
                await session.execute(
                    text("SELECT 1 FROM orders WHERE id = ANY(:ids) FOR UPDATE"), {"ids": order_ids}
                )
                unblocked = asyncio.create_task(cancel_all())
                concurrent = await _waiting_on_locks(sessionmaker, service, capacity)
            cancelled = await unblocked
            assert concurrent == capacity
            assert [s.status for s in cancelled] == [200] * capacity
            assert all(loads(s.body)["status"] == "cancelled" for s in cancelled)

            # A burst of twice the pools' size queues for connections and all succeed.
            burst = await asyncio.gather(
                *(
                    timed(
                        c,
                        "GET",
                        f"/v1/orders/{order_ids[i % capacity]}",
                        headers={**user.headers, "Cache-Control": "no-cache"},
                    )
                    for i, c in enumerate(clients * 2)
                )
            )
            assert [s.status for s in burst] == [200] * len(burst)
            backends = await service_backends(sessionmaker, service)
            assert len(backends) <= capacity
            assert not [b for b in backends if b["state"] == "idle in transaction (aborted)"]
        finally:
            for client in clients:
                await client.aclose()
    report(
        f"transaction timeout: {capacity} queries blocked, 503 after "
        f"{max(s.latency for s in timed_out):.2f}s at most; {concurrent} concurrent after"
    )
