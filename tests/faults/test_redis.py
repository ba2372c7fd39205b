"""Redis faults against `python -m api` (2 workers): `CLIENT PAUSE`, then a shutdown and restart."""

from __future__ import annotations

import asyncio
import itertools
import time

import httpx
import pytest

from tests.factories import TestUser
from tests.faults.conftest import StartService
from tests.faults.helpers import ORDER_BODY, Sample, metric_total, percentile, report, timed
from tests.services import redis_paused, redis_stopped

pytestmark = pytest.mark.faults

CLIENTS = 8
PAUSE_MS = 2000
MAX_WAIT = 1.0
P99_BOUND = 0.5


async def _load(
    client: httpx.AsyncClient, user: TestUser, order_ids: list[str], stop: asyncio.Event
) -> list[Sample]:
    """One storefront client in a closed loop: reads (cacheable) and a create every fourth."""
    samples: list[Sample] = []
    for step in itertools.count():
        if stop.is_set() or step > 5000:
            break
        match step % 4:
            case 0 | 2:
                order_id = order_ids[step % len(order_ids)]
                sample = await timed(client, "GET", f"/v1/orders/{order_id}", headers=user.headers)
            case 1:
                sample = await timed(client, "GET", "/v1/orders?limit=5", headers=user.headers)
            case _:
                sample = await timed(
                    client, "POST", "/v1/orders", json=ORDER_BODY, headers=user.headers
                )
        samples.append(sample)
    return samples


async def _metrics(client: httpx.AsyncClient) -> str:
    return (await client.get("/metrics")).text


def _decisions(exposition: str, backend: str) -> float:
    return metric_total(exposition, "rate_limit_decisions_total", backend=backend)


@pytest.mark.timeout(120)
async def test_redis_paused_then_restarted_never_holds_a_request_past_one_second(
    start_service: StartService, user: TestUser
) -> None:
    async with start_service() as service, service.client() as client:
        order_ids = []
        for _ in range(4):
            response = await client.post("/v1/orders", json=ORDER_BODY, headers=user.headers)
            assert response.status_code == 201
            order_ids.append(response.json()["id"])
        stop = asyncio.Event()
        load = [asyncio.create_task(_load(client, user, order_ids, stop)) for _ in range(CLIENTS)]
        try:
            await asyncio.sleep(2)
            before = await _metrics(client)
            async with redis_paused(PAUSE_MS):
                paused_at = time.monotonic()
                await asyncio.sleep(PAUSE_MS / 1000)
            await asyncio.sleep(2)
            async with redis_stopped():
                await asyncio.sleep(2)
            restarted_at = time.monotonic()
            during = await _metrics(client)
            await asyncio.sleep(3)
        finally:
            stop.set()
            results = await asyncio.gather(*load)
        after = await _metrics(client)

    samples = [sample for run in results for sample in run]
    latencies = [sample.latency for sample in samples]
    statuses = {sample.status for sample in samples}
    faulted = [s for s in samples if paused_at <= s.sent <= restarted_at]
    slowest = max(samples, key=lambda sample: sample.latency)
    report(
        f"redis pause+restart: {len(samples)} requests ({len(faulted)} during the faults), "
        f"p50 {percentile(latencies, 0.5) * 1000:.0f} ms, "
        f"p99 {percentile(latencies, 0.99) * 1000:.0f} ms, "
        f"max {slowest.latency * 1000:.0f} ms at +{slowest.sent - paused_at:.2f}s, "
        f"memory decisions {_decisions(after, 'memory') - _decisions(before, 'memory'):.0f}"
    )
    # Redis away is never an error for a client.
    assert statuses <= {200, 201}, [s for s in samples if s.status not in (200, 201)][:3]
    assert slowest.latency < MAX_WAIT, slowest
    assert percentile(latencies, 0.99) < P99_BOUND
    # The limiter fell back to per-process buckets during the faults...
    assert metric_total(during, "rate_limit_fallback_total") > metric_total(
        before, "rate_limit_fallback_total"
    )
    assert _decisions(during, "memory") > _decisions(before, "memory")
    # ...and went back to Redis once it answered again.
    assert _decisions(after, "redis") > _decisions(during, "redis")
    # The cache answered again after the restart.
    hits_after = [
        s
        for s in samples
        if s.sent > restarted_at + 1.5 and s.headers and s.headers.get("X-Cache") == "HIT"
    ]
    assert hits_after
