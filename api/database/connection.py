"""Connections to the primary, the async engine, sessions and the per-request transaction.

Every connection (pools, the relay's LISTEN, the CLI, Alembic, the tests' own) is made
by `connect_primary`: the configured nodes are tried in order and the first that accepts
writes is kept, libpq's `target_session_attrs=read-write`. A connection outside a pool
is `connect_raw(settings, ...)`. Behind PgBouncer in
transaction mode nothing is left on a server connection between transactions.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any

import asyncpg
import orjson
from fastapi import Depends, Request
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.util import greenlet_spawn

from api.configs import HostPort, Settings
from api.state import get_state

logger = logging.getLogger(__name__)

APPLICATION_NAME = "orders-api"


class NodeConnection(asyncpg.Connection):  # type: ignore[misc]
    """An asyncpg connection that knows which configured node it reached."""

    node: HostPort | None = None


class NoPrimaryError(ConnectionError):
    """No configured node answered as a writable primary (an outage: 503)."""


class BrokenConnectionError(ConnectionError):
    """A pooled connection the server already ended (an outage: 503)."""


# A node that cannot take this connection now, so the next one is tried: refused or
# unreachable, starting up or shutting down, or a standby (not read-write). Anything
# else (a wrong password, a missing database) is a misconfiguration and is raised.
_NEXT_NODE_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.TargetServerAttributeNotMatched,
)


def connect_options(
    settings: Settings, *, pooled: bool = True, timeouts: bool = True
) -> dict[str, Any]:
    """`asyncpg.connect` arguments; `pooled`: the connection goes through POSTGRES_POOLER.

    `timeouts`: statements are bounded by POSTGRES_TRANSACTION_TIMEOUT (not migrations).

    Through PgBouncer (transaction mode) the statement cache is off (a named prepared
    statement would outlive the transaction on a server connection another client gets
    next; asyncpg then sends unnamed statements, parsed in the same transaction as they
    run) and the startup packet carries only `application_name` (PgBouncer refuses other
    startup parameters). The timeouts then come from the role (README).
    """
    options: dict[str, Any] = {
        "user": settings.POSTGRES_USER,
        "password": settings.POSTGRES_PASSWORD.get_secret_value() or None,
        "timeout": settings.POSTGRES_CONNECT_TIMEOUT,
        "target_session_attrs": "read-write",
        "connection_class": NodeConnection,
    }
    if timeouts:
        # The client-side bound a little above the server's, so the server's error wins.
        options["command_timeout"] = settings.POSTGRES_TRANSACTION_TIMEOUT + 1
    if pooled and settings.behind_pgbouncer:
        options["statement_cache_size"] = 0
        options["server_settings"] = {"application_name": APPLICATION_NAME}
    elif not timeouts:
        options["server_settings"] = {"application_name": APPLICATION_NAME}
    else:
        timeout_ms = str(int(settings.POSTGRES_TRANSACTION_TIMEOUT * 1000))
        options["server_settings"] = {
            "application_name": APPLICATION_NAME,
            "statement_timeout": timeout_ms,
            "idle_in_transaction_session_timeout": timeout_ms,
        }
    return options


async def connect_primary(
    settings: Settings,
    *,
    hosts: Sequence[HostPort] | None = None,
    database: str | None = None,
    options: dict[str, Any] | None = None,
) -> NodeConnection:
    """A connection to the first of `hosts` (default: the configured ones) that takes writes.

    Each node gets the whole POSTGRES_CONNECT_TIMEOUT (asyncpg's own multi-host connect
    shares one timeout among all nodes, so a black-holed first node would use it all).
    """
    options = options if options is not None else connect_options(settings)
    nodes = list(hosts) if hosts is not None else settings.postgres_hosts
    failures: list[str] = []
    last: BaseException | None = None
    for node in nodes:
        try:
            conn = await asyncpg.connect(
                host=node.host,
                port=node.port,
                database=database or settings.POSTGRES_DB,
                **options,
            )
        except _NEXT_NODE_ERRORS as exc:
            failures.append(f"{node}: {_why_skipped(exc)}")
            last = exc
            continue
        assert isinstance(conn, NodeConnection)
        conn.node = node
        return conn
    raise NoPrimaryError(
        "no PostgreSQL node accepts writes (" + "; ".join(failures) + ")"
    ) from last


async def connect_raw(
    settings: Settings,
    *,
    database: str | None = None,
    hosts: Sequence[HostPort] | None = None,
    application_name: str | None = None,
    pooled: bool = True,
    timeouts: bool = True,
) -> NodeConnection:
    """A connection of its own (no pool) to the primary, made from `settings` as the pools'.

    `database` defaults to POSTGRES_DB and `hosts` to POSTGRES_HOSTS; `pooled` and
    `timeouts` as in `connect_options`; `application_name` replaces the service's in
    `pg_stat_activity`. The caller closes it.
    """
    options = connect_options(settings, pooled=pooled, timeouts=timeouts)
    if application_name is not None:
        options["server_settings"] = {
            **options["server_settings"],
            "application_name": application_name,
        }
    return await connect_primary(settings, hosts=hosts, database=database, options=options)


def _why_skipped(exc: BaseException) -> str:
    if isinstance(exc, asyncpg.TargetServerAttributeNotMatched):
        return "read-only"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return type(exc).__name__


def ends_the_connection(exc: BaseException | None) -> bool:
    """An error after which the connection must not be reused.

    A FATAL error (the server is going away: a crash, a shutdown, a dead postmaster)
    ends the session, though the socket may not have closed yet: reused, the connection
    would still be waiting for the end of the failed statement. A write refused as
    read-only means the node is no longer the primary (demoted or fenced).
    """
    while exc is not None:
        if isinstance(
            exc,
            asyncpg.PostgresConnectionError
            | asyncpg.ReadOnlySQLTransactionError
            # A connection left mid-operation (see `raw_connection`).
            | asyncpg.InternalClientError,
        ):
            return True
        if getattr(exc, "severity_en", None) in _FATAL or getattr(exc, "severity", None) in _FATAL:
            return True
        if getattr(exc, "sqlstate", None) == asyncpg.ReadOnlySQLTransactionError.sqlstate:
            return True
        exc = exc.__cause__
    return False


_FATAL = ("FATAL", "PANIC")

# PostgreSQL answers that mean "not now" rather than "this request is wrong".
_OUTAGE_CAUSES = (
    asyncpg.PostgresConnectionError,  # admin shutdown, cannot connect now, too many clients
    asyncpg.InterfaceError,
    asyncpg.OperatorInterventionError,  # statement_timeout, admin shutdown
    asyncpg.InsufficientResourcesError,
    # A write on a node that is no longer the primary (demoted or fenced); the
    # connection is dropped and the next one goes to the primary of POSTGRES_HOSTS.
    asyncpg.ReadOnlySQLTransactionError,
    OSError,  # refused or unreachable, NoPrimaryError, BrokenConnectionError
    TimeoutError,
)


def is_database_outage(exc: BaseException) -> bool:
    """PostgreSQL cannot serve now: down, unreachable, overloaded, failing over, timed out.

    The one judgement of it: the HTTP layer answers 503, the status consumer retries.
    It takes SQLAlchemy's errors (the driver's error in `orig`, its own pool timeout)
    and the driver's own, raised by statements on a `raw_connection`.
    """
    if isinstance(exc, sa_exc.TimeoutError):  # no pooled connection within POSTGRES_POOL_TIMEOUT
        return True
    cause: BaseException | None = exc
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated or isinstance(
            exc, sa_exc.OperationalError | sa_exc.InterfaceError
        ):
            return True
        cause = exc.orig
    while cause is not None:
        if isinstance(cause, _OUTAGE_CAUSES):
            return True
        cause = cause.__cause__
    return False


def _invalidate_ended_connections(context: ExceptionContext) -> None:
    # SQLAlchemy then drops this connection and every one pooled before it, so the next
    # checkout connects again, to whichever node is the primary by then; the request in
    # hand gets a 503 (the error is marked connection_invalidated).
    if ends_the_connection(context.original_exception):
        context.is_disconnect = True


def create_engine(
    settings: Settings, *, database: str | None = None, timeouts: bool = True
) -> AsyncEngine:
    """An asyncpg engine on the current primary, with the statement timeout on every connection.

    `timeouts=False` (migrations): statements run as long as they need.
    """
    options = connect_options(settings, timeouts=timeouts)

    async def connect() -> NodeConnection:
        return await connect_primary(settings, database=database, options=options)

    def creator() -> Any:
        # `async_creator` would not pass the adapter's own argument; this is the form
        # SQLAlchemy's `create_async_engine` uses for it.
        return engine.dialect.loaded_dbapi.connect(
            async_creator_fn=connect,
            # SQLAlchemy's own prepared-statement cache: off behind PgBouncer, as asyncpg's.
            prepared_statement_cache_size=0 if settings.behind_pgbouncer else 100,
        )

    engine = create_async_engine(
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
        creator=creator,
    )
    event.listen(engine.sync_engine, "handle_error", _invalidate_ended_connections)
    return engine


def connected_node(conn: asyncpg.Connection | None) -> HostPort | None:
    """The configured node a pooled connection reached."""
    return conn.node if isinstance(conn, NodeConnection) else None


def _json_text(value: Any) -> str:
    return orjson.dumps(value).decode()


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """The request's session; what the route left uncommitted commits when it returns.

    An error rolls it back. A route may commit earlier itself (`await session.commit()`)
    when something must follow the commit within the request: the cache bump after a
    write, a write that must hold though the answer is an error, or a slow wait that
    should not keep a pooled connection. The next statement starts a new transaction.
    A request that ran no SQL (a cache hit) costs only the session object.
    """
    session = get_state(request)["sessionmaker"]()
    try:
        yield session
        if session.in_transaction():
            await session.commit()
    finally:
        if session.in_transaction():  # an error, or a failed commit: roll back, release
            await session.close()


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
    autocommit (its own transaction), or for a transaction (`connection.transaction()`)
    that ends inside the block, as the relay's batch does; the connection must go back
    idle. A connection that PostgreSQL closed is never handed out, and one left in an
    unknown state by an error that is not PostgreSQL's own answer, or ended by one
    (`ends_the_connection`), is discarded instead of returned.
    """
    fairy = await _checkout(engine)
    while (conn := fairy.driver_connection) is None or conn.is_closed():
        # PostgreSQL restarted since it was pooled: drop it, try the next (or a new) one.
        await greenlet_spawn(fairy.invalidate)
        fairy = await _checkout(engine)
    try:
        yield conn
    except asyncpg.InternalClientError as exc:
        # The connection was mid-operation when we got it: an idle connection that
        # received the server's FATAL goodbye (a dead postmaster, a shutdown) is left
        # consuming that error until its socket's end is read, and looks open until then.
        # Nothing was sent; the request meets a dying server, so it is a 503.
        await greenlet_spawn(fairy.invalidate)
        raise BrokenConnectionError("the pooled PostgreSQL connection is unusable") from exc
    except asyncpg.PostgresError as exc:
        if ends_the_connection(exc):
            # The server went away, or the node stopped taking writes: never reuse it.
            await greenlet_spawn(fairy.invalidate)
        else:
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
