"""Redis as production deploys it (SPEC §12): faults that are not outages, TLS, failover
of a cluster primary and of a Sentinel primary under load, one quota for a whole fleet."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from redis.exceptions import ResponseError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.configs import Settings
from api.redis_core.client import create_redis
from api.redis_core.layer import open_redis_layer
from tests.conftest import run_settings
from tests.factories import TestUser, make_order, make_user
from tests.faults.helpers import metric_total
from tests.faults.service import running_service
from tests.redis_servers import ClusterServers, SentinelServers, TlsServer, topology_overrides

logger = logging.getLogger(__name__)

# uvicorn processes these tests start: their reserved loopback ports.
SERVICE_PORTS = (18301, 18302, 18303)
# SPEC §12: back on Redis within this long of the new primary being ready.
RECOVERY_BOUND = 5.0


def _prefix() -> str:
    return f"{run_settings().REDIS_KEY_PREFIX}{uuid.uuid4().hex[:8]}:"


@contextlib.asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield client


def _app(app_factory: Callable[..., FastAPI], **overrides: str) -> FastAPI:
    # No relay or status consumer: these apps share the run's RabbitMQ names.
    values = {
        "REDIS_KEY_PREFIX": _prefix(),
        "OUTBOX_RELAY_ENABLED": "false",
        "STATUS_CONSUMER_ENABLED": "false",
    }
    return app_factory(**{**values, **overrides})


async def _ready(client: httpx.AsyncClient) -> dict[str, Any]:
    body: dict[str, Any] = (await client.get("/ping/ready")).json()
    return body


# --- a fault is not an outage ----------------------------------------------------------


async def test_a_wrongtype_key_under_the_limiter_is_reported_not_a_silent_fallback(
    app_factory: Callable[..., FastAPI],
    sessionmaker: async_sessionmaker[AsyncSession],
    settings: Settings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    user = await make_user(sessionmaker, settings)
    prefix = _prefix()
    planted = create_redis(run_settings())
    try:
        await planted.set(f"{prefix}{{user:{user.id}}}:rl:default", "not a bucket")
        async with serve(_app(app_factory, REDIS_KEY_PREFIX=prefix)) as client:
            assert (await _ready(client))["checks"]["redis"]["status"] == "pass"
            capsys.readouterr()
            answers = [await client.get("/v1/orders", headers=user.headers) for _ in range(3)]
            ready = await _ready(client)
            metrics = (await client.get("/metrics")).text
            logged = capsys.readouterr().out
    finally:
        await planted.aclose()
    # Still served (from the per-process bucket), as in an outage...
    assert [a.status_code for a in answers] == [200, 200, 200]
    # ...but said: readiness, an error line naming it, a counter with its kind.
    redis_check = ready["checks"]["redis"]
    assert ready["status"] == "warn"
    assert redis_check["status"] == "warn"
    assert "WRONGTYPE" in redis_check["detail"]
    errors = [line for line in logged.splitlines() if '"level":"ERROR"' in line]
    assert any("WRONGTYPE" in line for line in errors), logged[-2000:]
    assert metric_total(metrics, "redis_errors_total", kind="WRONGTYPE") >= 3
    # Not counted as an outage: the circuit stayed closed, no outage fall-back logged.
    assert "rate limiting falls back" not in logged


# --- TLS -------------------------------------------------------------------------------


async def test_tls_standalone_limits_and_caches(
    app_factory: Callable[..., FastAPI],
    sessionmaker: async_sessionmaker[AsyncSession],
    settings: Settings,
    request: pytest.FixtureRequest,
) -> None:
    user = await make_user(sessionmaker, settings)
    tls = topology_overrides("tls", request)
    async with serve(_app(app_factory, RATE_LIMIT_DEFAULT="4/60", **tls)) as client:
        order = await make_order(client, user)
        url = f"/v1/orders/{order['id']}"
        answers = [await client.get(url, headers=user.headers) for _ in range(5)]
        ready = await _ready(client)
        metrics = (await client.get("/metrics")).text
    assert [a.status_code for a in answers] == [200, 200, 200, 200, 429]
    assert [a.headers["x-cache"] for a in answers[:4]] == ["MISS", "HIT", "HIT", "HIT"]
    assert ready["checks"]["redis"]["status"] == "pass"
    assert metric_total(metrics, "redis_errors_total", kind="TLS") == 0


async def test_tls_with_the_wrong_ca_fails_readiness_with_the_reason(
    app_factory: Callable[..., FastAPI],
    redis_tls: TlsServer,
    request: pytest.FixtureRequest,
    user: TestUser,
) -> None:
    tls = {**topology_overrides("tls", request), "REDIS_TLS_CA_FILE": str(redis_tls.wrong_ca_file)}
    async with serve(_app(app_factory, **tls)) as client:
        listed = await client.get("/v1/orders", headers=user.headers)
        ready = await _ready(client)
    assert listed.status_code == 200  # served without Redis
    assert listed.headers["x-cache"] == "BYPASS"
    redis_check = ready["checks"]["redis"]
    assert ready["status"] == "warn"
    assert redis_check["status"] in ("fail", "warn")
    assert "CERTIFICATE_VERIFY_FAILED" in redis_check["detail"].upper().replace(" ", "_")


# --- failover under load ---------------------------------------------------------------


@dataclass
class Sample:
    sent: float
    status: int
    cache: str | None


async def _reader(
    client: httpx.AsyncClient, url: str, user: TestUser, stop: asyncio.Event
) -> list[Sample]:
    samples: list[Sample] = []
    while not stop.is_set():
        sent = time.monotonic()
        response = await client.get(url, headers=user.headers)
        samples.append(Sample(sent, response.status_code, response.headers.get("x-cache")))
        await asyncio.sleep(0.01)
    return samples


async def _redis_decisions(client: httpx.AsyncClient) -> float:
    text = (await client.get("/metrics")).text
    return metric_total(text, "rate_limit_decisions_total", backend="redis")


async def _failover_under_load(
    client: httpx.AsyncClient,
    user: TestUser,
    kill: Callable[[], None],
    new_primary_ready: Callable[[], bool],
) -> None:
    """Kill a primary under reads: no 5xx, and HIT + Redis decisions within 5 s of the new one."""
    order = await make_order(client, user)
    url = f"/v1/orders/{order['id']}"
    await client.get(url, headers=user.headers)
    assert (await client.get(url, headers=user.headers)).headers["x-cache"] == "HIT"
    stop = asyncio.Event()
    readers = [asyncio.create_task(_reader(client, url, user, stop)) for _ in range(4)]
    try:
        await asyncio.sleep(0.5)
        killed_at = time.monotonic()
        kill()
        while not await asyncio.to_thread(new_primary_ready):
            assert time.monotonic() - killed_at < 30, "no new primary within 30 s"
            await asyncio.sleep(0.1)
        ready_at = time.monotonic()
        baseline = await _redis_decisions(client)
        redis_back_at: float | None = None
        while time.monotonic() - ready_at < RECOVERY_BOUND + 1:
            if redis_back_at is None and await _redis_decisions(client) > baseline + 4:
                redis_back_at = time.monotonic()
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        results = await asyncio.gather(*readers)
    samples = [sample for run in results for sample in run]
    assert {sample.status for sample in samples} == {200}
    during = [s for s in samples if killed_at <= s.sent < ready_at]
    assert during, "no read during the failover"
    first_hit = min(
        (s.sent for s in samples if s.sent >= ready_at and s.cache == "HIT"), default=None
    )
    assert first_hit is not None, "never a cache hit after the failover"
    assert first_hit - ready_at <= RECOVERY_BOUND
    assert redis_back_at is not None, "the limiter never went back to Redis"
    logger.warning(
        "failover: new primary %.1fs after the kill; %d reads (%d during), all 200; "
        "first HIT %.2fs and Redis decisions %.2fs after the new primary",
        ready_at - killed_at,
        len(samples),
        len(during),
        first_hit - ready_at,
        redis_back_at - ready_at,
    )
    assert redis_back_at - ready_at <= RECOVERY_BOUND


async def test_cluster_primary_killed_under_load(
    app_factory: Callable[..., FastAPI],
    sessionmaker: async_sessionmaker[AsyncSession],
    settings: Settings,
    redis_cluster: ClusterServers,
    request: pytest.FixtureRequest,
) -> None:
    user = await make_user(sessionmaker, settings)
    prefix = _prefix()
    key = f"{prefix}{{user:{user.id}}}:gen"
    victim = redis_cluster.primary_of(key)
    assert victim is not None
    overrides = {**topology_overrides("cluster", request), "REDIS_KEY_PREFIX": prefix}
    try:
        async with serve(_app(app_factory, **overrides)) as client:
            await _failover_under_load(
                client,
                user,
                kill=lambda: redis_cluster.node(victim).kill(),
                new_primary_ready=lambda: (
                    redis_cluster.primary_of(key) not in (None, victim) and redis_cluster.state_ok()
                ),
            )
    finally:
        await asyncio.to_thread(redis_cluster.restart, victim)


async def test_sentinel_primary_killed_under_load(
    app_factory: Callable[..., FastAPI],
    sessionmaker: async_sessionmaker[AsyncSession],
    settings: Settings,
    redis_sentinel: SentinelServers,
    request: pytest.FixtureRequest,
) -> None:
    user = await make_user(sessionmaker, settings)
    victim = redis_sentinel.primary_port()
    assert victim is not None
    overrides = topology_overrides("sentinel", request)
    try:
        async with serve(_app(app_factory, **overrides)) as client:
            await _failover_under_load(
                client,
                user,
                kill=lambda: redis_sentinel.node(victim).kill(),
                new_primary_ready=lambda: redis_sentinel.primary_port() not in (None, victim),
            )
    finally:
        # Back as a node; the sentinels make it a replica of the new primary.
        redis_sentinel.node(victim).start()


# --- one quota for the fleet -----------------------------------------------------------


@pytest.mark.timeout(300)
async def test_three_replicas_of_two_workers_share_one_quota_on_the_cluster(
    database: str,
    settings: Settings,
    sessionmaker: async_sessionmaker[AsyncSession],
    redis_cluster: ClusterServers,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    quota = 24
    user = await make_user(sessionmaker, settings)
    extra = {
        **topology_overrides("cluster", request),
        "REDIS_KEY_PREFIX": _prefix(),
        # A long window: no token comes back while the test runs.
        "RATE_LIMIT_DEFAULT": f"{quota}/3600",
        "OUTBOX_RELAY_ENABLED": "false",
        "STATUS_CONSUMER_ENABLED": "false",
        # This test is about sharing, not about a slow Redis: on a busy test machine a
        # worker's first call (the cluster's slot map) must not time out into the
        # per-process fallback, which `decided_on_redis` below would show.
        "REDIS_SOCKET_TIMEOUT": "3",
    }
    async with contextlib.AsyncExitStack() as stack:
        services = await asyncio.gather(
            *(
                stack.enter_async_context(
                    # Six workers importing at once on a busy machine: give them time.
                    running_service(settings, tmp_path, port=port, start_timeout=150, **extra)
                )
                for port in SERVICE_PORTS
            )
        )

        for service in services:  # every worker's client has its slot map
            for _ in range(6):
                async with service.client() as client:
                    assert (await client.get("/ping/ready")).status_code == 200

        async def one(index: int) -> int:
            # A fresh connection per request: the kernel spreads them over both workers.
            async with services[index % len(services)].client() as client:
                return (await client.get("/v1/auth/me", headers=user.headers)).status_code

        codes = await asyncio.gather(*(one(i) for i in range(quota * 3)))
        decided_on_redis = 0.0
        for service in services:
            async with service.client() as client:
                text = (await client.get("/metrics")).text
            decided_on_redis += metric_total(
                text, "rate_limit_decisions_total", policy="default", backend="redis"
            )
    # R x W = 6 processes, one quota: not 6 x 24.
    assert codes.count(200) == quota, sorted(codes)
    assert codes.count(429) == quota * 2
    assert decided_on_redis == quota * 3


# --- the auto-pipeline ------------------------------------------------------------------


@pytest.mark.parametrize("topology", ["standalone", "cluster"])
async def test_the_auto_pipeline_gives_each_caller_its_own_reply(
    topology: str, request: pytest.FixtureRequest
) -> None:
    # Replies, not timing: a generous bound for 600 calls on a busy test machine.
    settings = run_settings(**topology_overrides(topology, request), REDIS_SOCKET_TIMEOUT=5)
    layer = open_redis_layer(settings)
    prefix = _prefix()
    try:
        # 600 callers in one loop pass: more than one pipeline, over every cluster node.
        keys = [f"{prefix}{{n:{i}}}:counter" for i in range(600)]
        firsts = await asyncio.gather(
            *(layer.calls.execute("INCRBY", key, i) for i, key in enumerate(keys))
        )
        values = await asyncio.gather(*(layer.calls.execute("GET", key) for key in keys))
        wrong = layer.calls.execute("HGET", keys[1], "field")
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await wrong
        # A caller that gave up does not disturb the others' replies.
        abandoned = layer.calls.execute("GET", keys[2])
        abandoned.cancel()
        assert await layer.calls.execute("GET", keys[3]) == b"3"
    finally:
        await layer.close()
    assert firsts == list(range(600))
    assert values == [str(i).encode() for i in range(600)]
