"""A hung, slow or resetting peer: our TCP fault proxy in front of each dependency in turn.

One `python -m api` (2 workers) reaches PostgreSQL, Redis and RabbitMQ only through
proxies (tests/faults/proxy.py). Each test misbehaves one proxy and shows the
timeouts fire: answers stay bounded, /ping keeps answering, /ping/ready reports the
fault within its probe timeout, and everything recovers once the peer behaves.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.configs import Settings
from api.health import PROBE_TIMEOUT
from api.helpers.orjson_coder import loads
from tests.event_helpers import observe_events
from tests.factories import TestUser, make_user
from tests.faults.helpers import (
    ORDER_BODY,
    OpenTransactions,
    Sample,
    assert_unavailable_problem,
    report,
    timed,
    unsent_count,
)
from tests.faults.proxy import FaultProxy, Mode, fault_proxy
from tests.faults.service import WORKERS, RunningService, running_service, wait_for_consumers

pytestmark = pytest.mark.faults

TRANSACTION_TIMEOUT = 2.0
CONNECT_TIMEOUT = 1.0
REDIRECT_TIMEOUT = 2.0
SERVICE = "hung-peer"
SLACK = 0.5
# The relay's confirm wait (api/relay/outbox_relay.py: 0.8 x the transaction timeout).
PUBLISH_TIMEOUT = TRANSACTION_TIMEOUT * 0.8
# SQLAlchemy's asyncpg adapter closes an invalidated connection with close(timeout=2).
SQLALCHEMY_CLOSE_TIMEOUT = 2.0


@dataclass
class Proxied:
    service: RunningService
    client: httpx.AsyncClient
    postgres: FaultProxy
    redis: FaultProxy
    rabbitmq: FaultProxy


@pytest.fixture(scope="module")
async def proxied(
    settings: Settings,
    database: str,
    redis: Redis,
    rabbit_cleanup: None,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Proxied]:
    workdir: Path = tmp_path_factory.mktemp("hung-peer")
    async with (
        fault_proxy(settings.POSTGRES_PORT) as pg,
        fault_proxy(settings.REDIS_PORT) as rd,
        fault_proxy(settings.RMQ_PORT) as mq,
        running_service(
            settings,
            workdir,
            POSTGRES_PORT=str(pg.port),
            REDIS_PORT=str(rd.port),
            RMQ_PORT=str(mq.port),
            POSTGRES_TRANSACTION_TIMEOUT=str(TRANSACTION_TIMEOUT),
            POSTGRES_CONNECT_TIMEOUT=str(CONNECT_TIMEOUT),
            REDIRECT_SERVICES=SERVICE,
            REDIRECT_TIMEOUT=str(REDIRECT_TIMEOUT),
        ) as service,
        service.client(timeout=30.0) as client,
    ):
        # Both workers connected to RabbitMQ (through the proxy) before any fault.
        await wait_for_consumers(settings, settings.RMQ_STATUS_QUEUE, WORKERS, 30)
        yield Proxied(service, client, pg, rd, mq)


@pytest.fixture
async def customer(sessionmaker: async_sessionmaker[AsyncSession], settings: Settings) -> TestUser:
    return await make_user(sessionmaker, settings)


async def _until(check: Callable[[], Awaitable[bool]], timeout: float) -> float:
    """Seconds until `check()` holds; fails after `timeout`."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"not recovered after {timeout}s")
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def _ready(client: httpx.AsyncClient) -> tuple[Sample, dict[str, dict[str, object]]]:
    sample = await timed(client, "GET", "/ping/ready")
    return sample, loads(sample.body)["checks"]


async def _assert_alive(client: httpx.AsyncClient) -> None:
    ping = await timed(client, "GET", "/ping")
    assert ping.status == 200
    assert ping.latency < 0.2


async def _all_sent(sessionmaker: async_sessionmaker[AsyncSession], user: TestUser) -> bool:
    return await unsent_count(sessionmaker, user.id) == 0


async def _order(proxied: Proxied, user: TestUser) -> str:
    response = await proxied.client.post("/v1/orders", json=ORDER_BODY, headers=user.headers)
    assert response.status_code == 201, response.text
    order_id: str = response.json()["id"]
    return order_id


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", [Mode.BLACKHOLE, Mode.RESET])
async def test_hung_or_resetting_redis_costs_reads_and_writes_at_most_a_second(
    proxied: Proxied, customer: TestUser, mode: Mode
) -> None:
    client = proxied.client
    order_id = await _order(proxied, customer)
    url = f"/v1/orders/{order_id}"
    proxied.redis.set_mode(mode)
    try:
        samples = []
        for _ in range(10):
            samples.append(await timed(client, "GET", url, headers=customer.headers))
            samples.append(await timed(client, "GET", "/v1/orders", headers=customer.headers))
        samples += [
            await timed(client, "POST", "/v1/orders", json=ORDER_BODY, headers=customer.headers)
            for _ in range(3)
        ]
        await _assert_alive(client)
        ready, checks = await _ready(client)
    finally:
        proxied.redis.set_mode(Mode.PASS)

    assert [s.status for s in samples] == [200, 200] * 10 + [201] * 3
    assert max(s.latency for s in samples) < 1.0
    # Past the first failure the circuit is open: the rest never wait on Redis.
    assert sorted(s.latency for s in samples)[-3] < 0.25
    assert samples[-4].headers is not None
    assert samples[-4].headers["X-Cache"] == "BYPASS"
    assert ready.status == 200
    assert loads(ready.body)["status"] == "warn"
    assert checks["redis"]["status"] == "fail"
    assert ready.latency < PROBE_TIMEOUT + SLACK

    async def cached_again() -> bool:
        response = await client.get(url, headers=customer.headers)
        return response.headers.get("X-Cache") == "HIT"

    recovered = await _until(cached_again, timeout=10)
    report(f"redis {mode}: {len(samples)} requests, max {max(s.latency for s in samples):.2f}s, "
          f"cache HIT again {recovered:.1f}s after the peer behaved")  # fmt: skip


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", [Mode.BLACKHOLE, Mode.RESET])
async def test_hung_or_resetting_postgres_is_a_bounded_503_and_the_pool_recovers(
    proxied: Proxied, customer: TestUser, mode: Mode
) -> None:
    client = proxied.client
    order_id = await _order(proxied, customer)
    fresh = {**customer.headers, "Cache-Control": "no-cache"}
    proxied.postgres.set_mode(mode)
    try:
        reads = [
            await timed(client, "GET", f"/v1/orders/{order_id}", headers=fresh) for _ in range(3)
        ]
        write = await timed(client, "POST", "/v1/orders", json=ORDER_BODY, headers=customer.headers)
        await _assert_alive(client)
        ready, checks = await _ready(client)
    finally:
        proxied.postgres.set_mode(Mode.PASS)

    # A statement (or pre-ping) nobody answers on a pooled connection ends at asyncpg's
    # client-side bound (transaction timeout + 1 s), plus SQLAlchemy's 2 s close of that
    # connection; a new connection nobody answers ends at the connect timeout. Both are 503.
    bound = max(TRANSACTION_TIMEOUT + 1 + SQLALCHEMY_CLOSE_TIMEOUT, CONNECT_TIMEOUT) + SLACK
    for sample in [*reads, write]:
        assert_unavailable_problem(sample)
        assert sample.latency < bound, sample.latency
    assert ready.status == 503
    assert loads(ready.body)["status"] == "fail"
    assert checks["postgres"]["status"] == "fail"
    assert ready.latency < PROBE_TIMEOUT + SLACK

    async def reads_again() -> bool:
        response = await client.get(f"/v1/orders/{order_id}", headers=fresh)
        return response.status_code == 200

    recovered = await _until(reads_again, timeout=15)
    report(f"postgres {mode}: 503 after at most {max(s.latency for s in [*reads, write]):.2f}s; "
          f"reads again {recovered:.1f}s after the peer behaved")  # fmt: skip


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", [Mode.BLACKHOLE, Mode.RESET, Mode.LATENCY])
async def test_hung_slow_or_resetting_rabbitmq_never_blocks_a_request_and_loses_no_event(
    proxied: Proxied,
    customer: TestUser,
    settings: Settings,
    sessionmaker: async_sessionmaker[AsyncSession],
    mode: Mode,
) -> None:
    client = proxied.client
    async with observe_events(settings, robust=True) as observer:
        transactions = OpenTransactions(
            sessionmaker, settings.POSTGRES_DB, proxied.postgres.upstream_ports
        )
        proxied.rabbitmq.set_mode(mode, latency=0.3)
        try:
            creates = [
                await timed(client, "POST", "/v1/orders", json=ORDER_BODY, headers=customer.headers)
                for _ in range(5)
            ]
            gateway = await timed(
                client, "GET", f"/v1/redirect/{SERVICE}/x", headers=customer.headers
            )
            await _assert_alive(client)
            ready, _ = await _ready(client)
            # The relay's publish waits end at its timeout: attempts recorded, rows unsent.
            if mode is not Mode.LATENCY:
                await asyncio.sleep(TRANSACTION_TIMEOUT * 2)
                pending = await unsent_count(sessionmaker, customer.id)
        finally:
            proxied.rabbitmq.set_mode(Mode.PASS)
            await transactions.stop()
        created = {loads(s.body)["id"] for s in creates}
        started = time.monotonic()
        await observer.wait_for(
            lambda seen: created <= {loads(m.body)["subject"] for m in seen.messages}, timeout=40
        )
        delivered = time.monotonic() - started
        # A batch published while its claim transaction was cut is published again (same ids)
        # and then marked sent.
        await _until(lambda: _all_sent(sessionmaker, customer), timeout=30)

    assert [s.status for s in creates] == [201] * 5
    assert max(s.latency for s in creates) < 1.0
    assert gateway.status in (503, 504)
    assert gateway.latency < REDIRECT_TIMEOUT + SLACK
    assert ready.status == 200
    assert ready.latency < PROBE_TIMEOUT + SLACK
    if mode is not Mode.LATENCY:
        assert pending >= 5
    # No publish (channel open, confirms, close) outlived its timeout inside a claim
    # transaction; PostgreSQL would have cut one at the transaction timeout.
    assert transactions.oldest < PUBLISH_TIMEOUT + 0.3 < TRANSACTION_TIMEOUT
    report(f"rabbitmq {mode}: 5 orders 201 (max {max(s.latency for s in creates):.2f}s), "
          f"gateway {gateway.status} in {gateway.latency:.2f}s, ready rabbitmq="
          f"{loads(ready.body)['checks']['rabbitmq']['status']}, events delivered "
          f"{delivered:.1f}s after the peer behaved, oldest claim transaction "
          f"{transactions.oldest:.2f}s")  # fmt: skip
