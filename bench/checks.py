"""Checks that make a figure trustworthy: the request is answered right, writes really happen."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx

from bench.environment import Database
from bench.progress import log
from bench.report import ScenarioResult
from bench.scenarios import Probe
from bench.wrk_runner import WrkResult

QUIESCE_TIMEOUT = 90.0


async def probe(client: httpx.AsyncClient, base_url: str, spec: Probe) -> list[str]:
    """Send the scenario's request as wrk will; what differs from a correct answer."""
    response: httpx.Response | None = None
    for _ in range(spec.repeat):
        headers = dict(spec.request_headers)
        if spec.method == "POST":
            headers["Idempotency-Key"] = f"probe-{uuid.uuid4().hex}"
        response = await client.request(
            spec.method, base_url + spec.path, headers=headers, content=spec.body
        )
    assert response is not None
    problems: list[str] = []
    if response.status_code != spec.status:
        problems.append(f"probe answered {response.status_code}, expected {spec.status}")
    for name, allowed in spec.headers.items():
        value = response.headers.get(name)
        if value is None:
            problems.append(f"probe: no {name} header")
        elif allowed and value not in allowed:
            problems.append(f"probe: {name}: {value}, expected {'/'.join(sorted(allowed))}")
    problems.extend(
        f"probe: unexpected {name} header" for name in spec.absent if name in response.headers
    )
    return problems


async def count_orders(db: Database, user_id: str) -> int:
    query = "SELECT count(*) FROM orders WHERE user_id = $1"
    return int(await db.fetchval(query, uuid.UUID(user_id)))


async def check_created(
    db: Database,
    result: ScenarioResult,
    *,
    user_id: str,
    before: int,
    outcome: WrkResult,
) -> None:
    """Every response wrk counted made a new order: no idempotent replay, no silent failure."""
    created = await count_orders(db, user_id) - before
    # Requests cut at wrk's deadline may commit without being counted.
    if not outcome.requests <= created <= outcome.requests + result.scenario.connections:
        problem = f"{created} orders created for {outcome.requests} responses"
        result.problems.append(problem)
        log(f"check {result.scenario.key}: {problem}")


async def quiesce(db: Database) -> None:
    """Wait for the relays to drain the outbox, so one scenario's events do not load the next."""
    query = "SELECT count(*) FROM outbox WHERE sent_at IS NULL"
    deadline = time.monotonic() + QUIESCE_TIMEOUT
    backlog = int(await db.fetchval(query))
    if backlog:
        log(f"waiting for the relays to publish {backlog} outbox events")
    while backlog and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        backlog = int(await db.fetchval(query))
    if backlog:
        log(f"outbox still holds {backlog} unsent events after {QUIESCE_TIMEOUT:.0f}s")
