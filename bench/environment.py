"""What the run needs around it: services, a throw-away database, isolated names, cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import platform
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from api.configs import Settings, load_settings
from api.database.connection import connect_raw
from api.rabbit_core.topology import TopologyNames
from api.redis_core.client import create_redis
from bench.progress import log

ROOT = Path(__file__).resolve().parent.parent


# How long cleanup waits, in all, for a service that is down to come back.
CLEANUP_PATIENCE = 60.0


class SetupError(RuntimeError):
    """A precondition of the run failed; the message is the one line to show."""


@dataclass(frozen=True, slots=True)
class RunNames:
    """Everything the run creates, named with one random suffix so it never meets other data."""

    suffix: str

    @classmethod
    def new(cls) -> RunNames:
        return cls(uuid.uuid4().hex[:10])

    @property
    def database(self) -> str:
        return f"orders_bench_{self.suffix}"

    @property
    def redis_prefix(self) -> str:
        return f"bench:{self.suffix}:"

    @property
    def exchange(self) -> str:
        return f"bench.{self.suffix}.orders"

    @property
    def queue(self) -> str:
        return f"bench.{self.suffix}.orders.events"

    @property
    def status_queue(self) -> str:
        return f"bench.{self.suffix}.orders.status-updates"

    @property
    def rpc_exchange(self) -> str:
        return f"bench.{self.suffix}.orders.rpc"

    def env(self) -> dict[str, str]:
        """The variables that point a process at this run's database, keys and names."""
        return {
            "POSTGRES_DB": self.database,
            "REDIS_KEY_PREFIX": self.redis_prefix,
            "RMQ_EXCHANGE": self.exchange,
            "RMQ_QUEUE": self.queue,
            "RMQ_STATUS_QUEUE": self.status_queue,
            "RMQ_RPC_EXCHANGE": self.rpc_exchange,
        }


class Database:
    """The runner's own connection to the run's database, opened again if it drops.

    Opened once, so the runner never needs a new slot while the processes under test
    hold PostgreSQL's others; reopened when it is lost (a restart of PostgreSQL by
    someone else's fault test, say), waiting up to `RECONNECT_TIMEOUT` for it.
    """

    RECONNECT_TIMEOUT = 30.0

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: asyncpg.Connection | None = None

    async def fetchval(self, query: str, *args: object) -> Any:
        try:
            return await (await self.connection()).fetchval(query, *args)
        except (asyncpg.InterfaceError, asyncpg.PostgresConnectionError, OSError):
            await self.close()
            log("the runner's PostgreSQL connection dropped; reconnecting")
            return await (await self.connection(self.RECONNECT_TIMEOUT)).fetchval(query, *args)

    async def connection(self, patience: float = 0.0) -> asyncpg.Connection:
        deadline = time.monotonic() + patience
        while self._conn is None or self._conn.is_closed():
            try:
                self._conn = await asyncpg.connect(self.dsn, timeout=5)
            except (asyncpg.PostgresError, OSError):
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(1.0)
        return self._conn

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close(timeout=5)
            self._conn = None


def check_services() -> None:
    """PostgreSQL, Redis and RabbitMQ answer (started when local and stopped)."""
    script = ROOT / "scripts" / "services.sh"
    result = subprocess.run(
        [str(script), "--no-db"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise SetupError(result.stderr.strip() or "scripts/services.sh --no-db failed")


def run_settings(names: RunNames) -> Settings:
    """The configured settings, pointed at this run's database and names."""
    os.environ.update(names.env())
    return load_settings()


async def _admin_connection(settings: Settings) -> asyncpg.Connection:
    return await connect_raw(settings, database="postgres", timeouts=False)


async def create_database(settings: Settings) -> None:
    conn = await _admin_connection(settings)
    try:
        await conn.execute(f'CREATE DATABASE "{settings.POSTGRES_DB}"')
    finally:
        await conn.close()


def migrate(env: dict[str, str]) -> None:
    """`alembic upgrade head` against the throw-away database, as `make migrate` does."""
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        tail = " | ".join(result.stderr.strip().splitlines()[-3:])
        raise SetupError(f"alembic upgrade head failed: {tail}")


async def drop_database(settings: Settings) -> None:
    conn = await _admin_connection(settings)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{settings.POSTGRES_DB}" WITH (FORCE)')
    finally:
        await conn.close()


async def delete_redis_keys(settings: Settings) -> int:
    """Delete every key under the run's prefix; the number deleted."""
    client = create_redis(settings)
    deleted = 0
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=f"{settings.REDIS_KEY_PREFIX}*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += await client.delete(*batch)
                batch.clear()
        if batch:
            deleted += await client.delete(*batch)
    finally:
        await client.aclose()
    return deleted


async def delete_rabbit_names(settings: Settings) -> None:
    """Delete the run's queues (with their dead-letter queues) and exchanges."""
    import aio_pika

    connection = await aio_pika.connect(settings.rabbitmq_url, timeout=5)
    async with connection:
        channel = await connection.channel()
        names = TopologyNames.from_settings(settings)
        for queue in names.queues:
            await channel.queue_delete(queue)
        for exchange in names.exchanges:
            await channel.exchange_delete(exchange)


async def clean_up(settings: Settings) -> None:
    """Remove what the run created; each step on its own, so one failure skips nothing else.

    A service that is down (a fault test elsewhere restarting it, say) is waited for,
    up to `CLEANUP_PATIENCE` seconds for all steps together.
    """
    deadline = time.monotonic() + CLEANUP_PATIENCE
    steps: tuple[tuple[str, Callable[[Settings], Awaitable[object]]], ...] = (
        ("database", drop_database),
        ("redis keys", delete_redis_keys),
        ("rabbitmq names", delete_rabbit_names),
    )
    for name, step in steps:
        while True:
            try:
                await step(settings)
                break
            except Exception as exc:  # cleanup reports and goes on
                if time.monotonic() >= deadline:
                    log(f"cleanup of {name} failed: {type(exc).__name__}: {exc}")
                    break
                await asyncio.sleep(2.0)


def machine_info() -> dict[str, object]:
    """What the figures came from."""
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model or platform.processor(),
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": [round(value, 2) for value in os.getloadavg()],
    }


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None
