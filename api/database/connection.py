"""The async engine, the session factory and the one-transaction-per-request dependency."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import asyncpg
import orjson
from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.util import greenlet_spawn

from api.configs import Settings
from api.state import get_state


def create_engine(settings: Settings, *, database: str | None = None) -> AsyncEngine:
    """An asyncpg engine whose every connection carries the statement timeout."""
    timeout_ms = str(int(settings.POSTGRES_TRANSACTION_TIMEOUT * 1000))
    return create_async_engine(
        settings.postgres_url(database),
        echo=settings.POSTGRES_ECHO,
        # Statement parameters (password hashes, tokens) never reach logs or tracebacks.
        hide_parameters=True,
        pool_size=settings.POSTGRES_POOL_SIZE,
        max_overflow=settings.POSTGRES_MAX_OVERFLOW,
        pool_timeout=settings.POSTGRES_POOL_TIMEOUT,
        pool_pre_ping=settings.POSTGRES_POOL_PRE_PING,
        pool_recycle=1800,
        # JSONB in and out through orjson, for SQLAlchemy and for `raw_connection` alike
        # (the dialect installs these as the asyncpg connection's codecs).
        json_serializer=_json_text,
        json_deserializer=orjson.loads,
        connect_args={
            "timeout": settings.POSTGRES_CONNECT_TIMEOUT,
            # The client-side bound a little above the server's, so the server's error wins.
            "command_timeout": settings.POSTGRES_TRANSACTION_TIMEOUT + 1,
            "server_settings": {
                "application_name": "orders-api",
                "statement_timeout": timeout_ms,
                "idle_in_transaction_session_timeout": timeout_ms,
            },
        },
    )


def _json_text(value: Any) -> str:
    return orjson.dumps(value).decode()


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


AfterCommit = Callable[[], Awaitable[object]]
_AFTER_COMMIT = "after_commit"


def after_commit(session: AsyncSession, callback: AfterCommit) -> None:
    """Run `callback` once this session's transaction has committed (never on rollback)."""
    session.info.setdefault(_AFTER_COMMIT, []).append(callback)


async def run_after_commit(session: AsyncSession) -> None:
    for callback in session.info.pop(_AFTER_COMMIT, ()):
        await callback()


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One transaction per request, committed when the endpoint returns.

    After-commit callbacks (cache invalidation) run before the response is sent,
    so the client's next read already sees its write.
    """
    async with get_state(request)["sessionmaker"]() as session:
        async with session.begin():
            yield session
        await run_after_commit(session)


@asynccontextmanager
async def open_session(request: Request) -> AsyncIterator[AsyncSession]:
    """A transaction opened only when needed: cacheable reads touch the database on a miss."""
    async with get_state(request)["sessionmaker"]() as session, session.begin():
        yield session


async def _checkout(engine: AsyncEngine) -> PoolProxiedConnection:
    try:
        return await engine.raw_connection()
    except engine.dialect.loaded_dbapi.Error as exc:
        # The pool hands out the driver's own error here (no SQLAlchemy wrapper): a
        # connection that cannot be made is an unavailable database (503), whatever the cause.
        raise ConnectionError("cannot connect to PostgreSQL") from exc


@asynccontextmanager
async def raw_connection(engine: AsyncEngine) -> AsyncIterator[asyncpg.Connection]:
    """An asyncpg connection from the engine's pool, for the hottest paths' hand-written SQL.

    On a single-row read or write SQLAlchemy's per-statement work (cache keys, compiled
    cache lookup, result processing) costs more CPU than the round trip; here a statement
    goes straight to asyncpg's prepared-statement cache. Use it for one statement in
    autocommit (its own transaction); the connection must go back idle. A connection that
    PostgreSQL closed is never handed out, and one left in an unknown state by an error
    that is not PostgreSQL's own answer is discarded instead of returned.
    """
    fairy = await _checkout(engine)
    while (conn := fairy.driver_connection) is None or conn.is_closed():
        # PostgreSQL restarted since it was pooled: drop it, try the next (or a new) one.
        await greenlet_spawn(fairy.invalidate)
        fairy = await _checkout(engine)
    try:
        yield conn
    except asyncpg.PostgresError:
        await greenlet_spawn(fairy.close)
        raise
    except BaseException:
        await greenlet_spawn(fairy.invalidate)
        raise
    else:
        await greenlet_spawn(fairy.close)


# scope="function": the commit runs before the response is sent, so a failed
# commit becomes an error response instead of following a 2xx.
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]
