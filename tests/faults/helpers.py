"""Measuring what a client sees under a fault, and counting what PostgreSQL holds afterwards."""

from __future__ import annotations

import asyncio
import math
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.faults.service import RunningService

PROBLEM = "application/problem+json"
UNAVAILABLE = "urn:orders-api:problem:service-unavailable"
# Words that would betray a stack trace, SQL or a driver in a response body.
LEAKS = ("Traceback", 'File "', "sqlalchemy", "asyncpg", "SELECT ", "INSERT ", "redis.")

ORDER_BODY: dict[str, Any] = {
    "currency": "EUR",
    "items": [{"sku": "FAULT-1", "name": "Widget", "quantity": 1, "unit_price": 250}],
}


@dataclass(frozen=True, slots=True)
class Sample:
    """One request as the client saw it (monotonic clock)."""

    sent: float
    received: float
    status: int
    body: bytes = b""
    content_type: str = ""
    headers: httpx.Headers | None = None

    @property
    def latency(self) -> float:
        return self.received - self.sent


async def timed(client: httpx.AsyncClient, method: str, url: str, **kwargs: Any) -> Sample:
    """Send one request; a transport error counts as status 0 (the service dropped us)."""
    sent = time.monotonic()
    try:
        response = await client.request(method, url, **kwargs)
    except httpx.HTTPError as exc:
        return Sample(sent, time.monotonic(), 0, repr(exc).encode())
    return Sample(
        sent,
        time.monotonic(),
        response.status_code,
        response.content,
        response.headers.get("content-type", ""),
        response.headers,
    )


def report(figures: str) -> None:
    """The figures a fault test measured, printed for `pytest -s` and the issue note."""
    print(f"\n[faults] {figures}")  # noqa: T201


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (fraction in 0..1)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def assert_unavailable_problem(sample: Sample) -> None:
    """A 503 `service-unavailable` problem, with nothing internal in it."""
    assert sample.status == 503, sample
    assert sample.content_type == PROBLEM, sample
    assert f'"type":"{UNAVAILABLE}"' in sample.body.decode(), sample
    for leak in LEAKS:
        assert leak not in sample.body.decode(), sample


def metric_total(exposition: str, name: str, **labels: str) -> float:
    """The sum of every sample of `name` whose labels include `labels`."""
    total = 0.0
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{(?P<labels>[^}}]*)\}})? (?P<value>\S+)$", re.M)
    for match in pattern.finditer(exposition):
        found = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"] or ""))
        if all(found.get(key) == value for key, value in labels.items()):
            total += float(match["value"])
    return total


async def scalar(sessionmaker: async_sessionmaker[AsyncSession], sql: str, **params: Any) -> Any:
    async with sessionmaker() as session:
        return (await session.execute(text(sql), params)).scalar_one()


async def order_count(sessionmaker: async_sessionmaker[AsyncSession], user_id: uuid.UUID) -> int:
    return int(
        await scalar(sessionmaker, "SELECT count(*) FROM orders WHERE user_id = :u", u=user_id)
    )


# The outbox rows about one user's orders (the envelope's subject is the order id).
_USER_EVENTS = """
    FROM outbox JOIN orders
      ON orders.id::text = convert_from(outbox.body, 'UTF8')::jsonb ->> 'subject'
    WHERE orders.user_id = :u
"""


async def outbox_count(sessionmaker: async_sessionmaker[AsyncSession], user_id: uuid.UUID) -> int:
    return int(await scalar(sessionmaker, f"SELECT count(*) {_USER_EVENTS}", u=user_id))


async def unsent_count(sessionmaker: async_sessionmaker[AsyncSession], user_id: uuid.UUID) -> int:
    sql = f"SELECT count(*) {_USER_EVENTS} AND outbox.sent_at IS NULL"
    return int(await scalar(sessionmaker, sql, u=user_id))


async def orders_without_event(
    sessionmaker: async_sessionmaker[AsyncSession], user_id: uuid.UUID
) -> int:
    """Orders of `user_id` that have no outbox row at all."""
    return int(
        await scalar(
            sessionmaker,
            """
            SELECT count(*) FROM orders WHERE user_id = :u AND NOT EXISTS (
                SELECT 1 FROM outbox
                WHERE convert_from(outbox.body, 'UTF8')::jsonb ->> 'subject' = orders.id::text
            )
            """,
            u=user_id,
        )
    )


async def backends_on_ports(
    sessionmaker: async_sessionmaker[AsyncSession], database: str, ports: set[int]
) -> list[dict[str, Any]]:
    """PostgreSQL sessions on `database` whose client port is one of `ports`: state, what
    they wait on, transaction age."""
    async with sessionmaker() as session:
        rows = (
            await session.execute(
                text(
                    """
                    SELECT pid, client_port, state, wait_event_type, application_name,
                           extract(epoch FROM now() - xact_start)::float AS xact_age
                    FROM pg_stat_activity WHERE datname = :db
                    """
                ),
                {"db": database},
            )
        ).all()
    return [dict(row._mapping) for row in rows if row.client_port in ports]


async def service_backends(
    sessionmaker: async_sessionmaker[AsyncSession], service: RunningService
) -> list[dict[str, Any]]:
    """The service workers' PostgreSQL sessions (this test process's own never count)."""
    ports = service.postgres_client_ports()
    return await backends_on_ports(sessionmaker, service.settings.POSTGRES_DB, ports)


class OpenTransactions:
    """Samples the age of the oldest open transaction among sessions on `ports()`.

    The relay awaits publisher confirms inside its claim transaction, so a publish that
    blocked past its timeout would show here as an old transaction.
    """

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        database: str,
        ports: Callable[[], set[int]],
    ) -> None:
        self.oldest = 0.0
        self._sessionmaker = sessionmaker
        self._database = database
        self._ports = ports
        self._task = asyncio.create_task(self._sample())

    async def _sample(self) -> None:
        for _ in range(3000):
            try:
                backends = await backends_on_ports(
                    self._sessionmaker, self._database, self._ports()
                )
            except Exception:  # noqa: S112 - a sample may fail; the next one counts
                continue
            ages = [b["xact_age"] for b in backends if b["xact_age"] is not None]
            self.oldest = max([self.oldest, *ages])
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
