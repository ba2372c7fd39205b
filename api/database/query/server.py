"""SQL about the server a connection reached: whether it answers, and its address."""

from __future__ import annotations

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

_PING = "SELECT 1"


async def ping(conn: AsyncConnection) -> None:
    """One round trip on a pooled connection (readiness)."""
    await conn.execute(text(_PING))


async def ping_raw(conn: asyncpg.Connection, *, timeout: float) -> None:
    """One round trip on a connection of its own, bounded by `timeout` seconds."""
    await conn.execute(_PING, timeout=timeout)


async def server_address(conn: asyncpg.Connection) -> tuple[str, int] | None:
    """The address and port the server accepted this connection on; None over a Unix socket.

    Through PgBouncer: the PostgreSQL server PgBouncer itself connected to.
    """
    row = await conn.fetchrow("SELECT host(inet_server_addr()) AS host, inet_server_port() AS port")
    if row is None or row["host"] is None:
        return None
    return row["host"], row["port"]
