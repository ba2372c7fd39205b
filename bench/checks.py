"""Checks that make a figure trustworthy: right answers, real writes, a quiet machine."""

from __future__ import annotations

import asyncio
import os
import re
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

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


# Other work on the machine: on a shared 2-core machine a test suite can take a core in
# the middle of a round. Before and after each wrk run the runner reads the CPU time of
# every process that is not the run's own (its process groups and their children, the
# PostgreSQL backends of its database, the shared Redis/RabbitMQ); the difference over
# the window, in cores, is the noise behind the figure.
SHARED_SERVICES = frozenset({"redis-server", "beam.smp", "erl_child_setup", "epmd"})
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# `postgres: 15/main: <user> <database> <client> ...`: a backend serving one database.
_BACKEND = re.compile(r"^postgres: [^:]+: \S+ (\S+) ")


@dataclass(frozen=True, slots=True)
class CpuSample:
    at: float
    # Other processes: pid -> (name, CPU ticks).
    others: dict[int, tuple[str, int]]


def cpu_sample(sessions: Collection[int], database: str) -> CpuSample:
    others: dict[int, tuple[str, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command, _, rest = (entry / "stat").read_text().rpartition(") ")
            name = command.rpartition("(")[2]
            fields = rest.split()
            if int(fields[3]) in sessions or name in SHARED_SERVICES:
                continue
            if name == "postgres":
                title = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
                backend = _BACKEND.match(title.decode(errors="replace"))
                if backend is None or backend.group(1) == database:
                    continue  # PostgreSQL's own housekeeping, or the run's backend
                name = f"postgres ({backend.group(1)})"
        except (OSError, IndexError):
            continue  # gone meanwhile
        others[int(entry.name)] = (name, int(fields[11]) + int(fields[12]))
    return CpuSample(time.monotonic(), others)


def other_work(before: CpuSample, after: CpuSample) -> tuple[float, list[str]]:
    """Cores' worth of CPU the other processes took between the samples; the top three."""
    scale = CLOCK_TICKS * max(after.at - before.at, 1e-9)
    consumers: dict[str, int] = {}
    for pid, (name, ticks) in after.others.items():
        # A process started inside the window used all its time there.
        earlier = before.others.get(pid, (name, 0))[1]
        consumers[name] = consumers.get(name, 0) + max(0, ticks - earlier)
    top = sorted(consumers.items(), key=lambda item: item[1], reverse=True)[:3]
    return sum(consumers.values()) / scale, [
        f"{name} {ticks / scale:.2f}" for name, ticks in top if ticks
    ]
