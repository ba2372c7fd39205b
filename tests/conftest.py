"""Fixtures: one database, Redis prefix and set of RabbitMQ names per test run.

Everything runs against the real PostgreSQL, Redis and RabbitMQ. The schema is
built by `alembic upgrade head`, exactly as in production.

`--postgres-via=pgbouncer` runs the same tests with the database behind a PgBouncer
in transaction mode (POSTGRES_POOLER=pgbouncer), in front of a private PostgreSQL,
with more client processes than PgBouncer has server connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import asyncpg
import httpx
import pytest
from alembic import command
from alembic.config import Config
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from api.configs import Settings
from api.database.connection import connect_raw, create_engine, create_sessionmaker
from api.main import create_app
from api.rabbit_core.topology import TopologyNames
from tests.factories import TestUser, make_user
from tests.pg_cluster import PGBOUNCER_PORT, PrivateCluster
from tests.rabbit_cluster import Cluster, start_cluster
from tests.redis_servers import redis_cluster, redis_sentinel, redis_tls

# Private Redis deployments (cluster, Sentinel, TLS), started on first use.
__all__ = ["redis_cluster", "redis_sentinel", "redis_tls"]

RUN_ID = uuid.uuid4().hex[:10]
# The database endpoint of this run: empty (the configured PostgreSQL) or PgBouncer's.
POSTGRES_ENDPOINT: dict[str, Any] = {}
PGBOUNCER_CLIENT_PROCESSES = 3


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--postgres-via",
        choices=("direct", "pgbouncer"),
        default="direct",
        help="reach PostgreSQL directly, or through a private PgBouncer in transaction mode",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--postgres-via") == "pgbouncer":
        POSTGRES_ENDPOINT.update(
            POSTGRES_HOST="127.0.0.1", POSTGRES_PORT=PGBOUNCER_PORT, POSTGRES_POOLER="pgbouncer"
        )


def run_settings(**overrides: Any) -> Settings:
    """Settings isolated to this test run; rate limits generous unless a test tightens them."""
    values: dict[str, Any] = {
        "APP_ENV": "development",
        "POSTGRES_DB": f"orders_test_{RUN_ID}",
        "REDIS_KEY_PREFIX": f"test:{RUN_ID}:",
        "RMQ_EXCHANGE": f"test.{RUN_ID}.orders",
        "RMQ_QUEUE": f"test.{RUN_ID}.orders.events",
        "RMQ_STATUS_QUEUE": f"test.{RUN_ID}.orders.status-updates",
        "RMQ_RPC_EXCHANGE": f"test.{RUN_ID}.orders.rpc",
        "RATE_LIMIT_DEFAULT": "100000/60",
        "RATE_LIMIT_AUTH": "100000/60",
        "RATE_LIMIT_ORDERS_CREATE": "100000/60",
        "ENV_ALLOWED_ORIGINS": "http://storefront.test",
        "LOGLEVEL": "INFO",
        **POSTGRES_ENDPOINT,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


async def _admin_connection(settings: Settings) -> asyncpg.Connection:
    # No statement timeout: creating or dropping a database takes what it takes.
    return await connect_raw(settings, database="postgres", timeouts=False)


def _alembic_config(settings: Settings) -> Config:
    config = Config("alembic.ini")
    config.attributes["url"] = settings.postgres_url().render_as_string(hide_password=False)
    config.attributes["configure_logger"] = False
    return config


@pytest.fixture(scope="session", autouse=True)
def private_postgres() -> Iterator[PrivateCluster | None]:
    """With `--postgres-via=pgbouncer`: a private primary and a PgBouncer in front of it."""
    if not POSTGRES_ENDPOINT:
        yield None
        return
    cluster = PrivateCluster()
    try:
        cluster.start_primary(synchronous=False)
        cluster.start_pgbouncer()
        yield cluster
    finally:
        cluster.stop_all()


@pytest.fixture(scope="session")
def settings() -> Settings:
    return run_settings()


@contextlib.asynccontextmanager
async def pgbouncer_clients(settings: Settings) -> AsyncIterator[None]:
    """Through PgBouncer: other client processes share its few server connections meanwhile.

    Each runs transactions (an advisory transaction lock, SET LOCAL, a raw statement) on
    this run's database in a loop and exits on the first error, which fails the run.
    """
    from tests.event_helpers import settings_env

    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.pgbouncer_client",
            env=settings_env(settings),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(PGBOUNCER_CLIENT_PROCESSES)
    ]
    try:
        yield
    finally:
        failures = []
        for process in processes:
            if process.returncode is None:
                process.terminate()
                await process.wait()
            else:
                assert process.stderr is not None
                failures.append((await process.stderr.read()).decode(errors="replace"))
        assert not failures, f"a PgBouncer client process failed: {failures[0][-3000:]}"


@pytest.fixture(scope="session")
async def database(settings: Settings) -> AsyncIterator[str]:
    """This run's database, created and migrated to head; dropped at the end."""
    conn = await _admin_connection(settings)
    try:
        await conn.execute(f'CREATE DATABASE "{settings.POSTGRES_DB}"')
    finally:
        await conn.close()
    # env.py runs its own event loop, so the migration runs in a thread.
    await asyncio.to_thread(command.upgrade, _alembic_config(settings), "head")
    async with contextlib.AsyncExitStack() as stack:
        if POSTGRES_ENDPOINT:
            await stack.enter_async_context(pgbouncer_clients(settings))
        yield settings.POSTGRES_DB
    conn = await _admin_connection(settings)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{settings.POSTGRES_DB}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def engine(database: str, settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(settings)
    yield engine
    await engine.dispose()


@pytest.fixture(scope="session")
def sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return create_sessionmaker(engine)


@pytest.fixture(scope="session")
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    """A plain client for assertions; removes every key of this run at the end."""
    client = Redis(host=settings.REDIS_HOST, port=settings.REDIS_PORT, db=settings.REDIS_DB)
    yield client
    try:
        async for key in client.scan_iter(match=f"{settings.REDIS_KEY_PREFIX}*", count=1000):
            await client.delete(key)
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
async def rabbit_cleanup(settings: Settings) -> AsyncIterator[None]:
    """Delete this run's exchanges and queues at the end of the session."""
    yield
    import aio_pika

    try:
        connection = await aio_pika.connect(settings.rabbitmq_url, timeout=5)
    except Exception:
        return
    async with connection:
        channel = await connection.channel()
        names = TopologyNames.from_settings(settings)
        for queue in names.queues:
            await channel.queue_delete(queue)
        for exchange in names.exchanges:
            await channel.exchange_delete(exchange)


@pytest.fixture(scope="session")
def rabbit_cluster() -> Iterator[Cluster]:
    """A private three-node RabbitMQ cluster (ports 5701-5703), started only for the tests
    that ask for it, once per session; every node is stopped at the end, also on failure."""
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def app_factory(database: str, redis: Redis, rabbit_cleanup: None) -> Callable[..., FastAPI]:
    """Build an app on this run's isolated resources, with optional setting overrides."""

    def build(**overrides: Any) -> FastAPI:
        return create_app(run_settings(**overrides))

    return build


@pytest.fixture(scope="session")
async def app(app_factory: Callable[..., FastAPI]) -> AsyncIterator[FastAPI]:
    application = app_factory()
    async with LifespanManager(application, startup_timeout=30, shutdown_timeout=30) as manager:
        # The app starts without waiting for RabbitMQ; the shared test app waits for it.
        await manager._state["rabbit"].wait_connected(timeout=30)
        yield manager.app  # type: ignore[misc]


@pytest.fixture(scope="session")
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


@pytest.fixture
async def user(sessionmaker: async_sessionmaker[AsyncSession], settings: Settings) -> TestUser:
    return await make_user(sessionmaker, settings)


@pytest.fixture
async def other_user(
    sessionmaker: async_sessionmaker[AsyncSession], settings: Settings
) -> TestUser:
    return await make_user(sessionmaker, settings)


@pytest.fixture
async def admin(sessionmaker: async_sessionmaker[AsyncSession], settings: Settings) -> TestUser:
    return await make_user(sessionmaker, settings, role="admin")
