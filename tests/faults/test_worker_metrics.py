"""`/metrics` of `python -m api` with WORKERS=2: every worker's requests, whichever answers."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.faults.conftest import StartService
from tests.faults.service import client_port

REQUESTS = 60
PING_COUNT = re.compile(
    r'^http_requests_total\{method="GET",route="/ping",status="200"\} (\S+)$', re.M
)


@pytest.mark.timeout(60)
async def test_metrics_add_up_the_requests_of_both_workers(start_service: StartService) -> None:
    async with start_service() as service:
        before = await _ping_count(service.base_url)
        workers: set[int | None] = set()
        # A new connection per request, so the kernel spreads them over both workers.
        for _ in range(REQUESTS):
            async with httpx.AsyncClient(base_url=service.base_url, trust_env=False) as client:
                response = await client.get("/ping")
                assert response.status_code == 200
                workers.add(service.worker_of(client_port(response)))
        after = await _ping_count(service.base_url)
        worker_pids = set(service.worker_pids())
    # (The children also include multiprocessing's resource tracker.)
    assert len(workers) == 2, "both workers should have answered some requests"
    assert workers <= worker_pids
    # Each scrape is itself a /metrics request, not a /ping one.
    assert after - before == REQUESTS


async def _ping_count(base_url: str) -> float:
    async with httpx.AsyncClient(base_url=base_url, trust_env=False) as client:
        text = (await client.get("/metrics")).text
    found = PING_COUNT.search(text)
    return float(found.group(1)) if found else 0.0
