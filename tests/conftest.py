"""Fixtures: one database, Redis prefix and set of RabbitMQ names per test run.

Everything runs against the real PostgreSQL, Redis and RabbitMQ. The schema is
built by `alembic upgrade head`, exactly as in production.
"""

from __future__ import annotations

import asyncio
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
from api.database.connection import create_engine, create_sessionmaker
from api.main import create_app
from api.rabbit_core.topology import TopologyNames
from tests.factories import TestUser, make_user
from tests.rabbit_cluster import Cluster, start_cluster
from tests.redis_servers import redis_cluster, redis_sentinel, redis_tls

# Private Redis deployments (cluster, Sentinel, TLS), started on first use.
__all__ = ["redis_cluster", "redis_sentinel", "redis_tls"]

RUN_ID = uuid.uuid4().hex[:10]


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
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


async def _admin_connection(settings: Settings) -> asyncpg.Connection:
    return await asyncpg.connect(
        host=settings.POSTGRES_HOST,
        port=settings.POSTGRES_PORT,
        user=settings.POSTGRES_USER,
        database="postgres",
    )


def _alembic_config(settings: Settings) -> Config:
    config = Config("alembic.ini")
    config.attributes["url"] = settings.postgres_url().render_as_string(hide_password=False)
    config.attributes["configure_logger"] = False
    return config


@pytest.fixture(scope="session")
def settings() -> Settings:
    return run_settings()


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
