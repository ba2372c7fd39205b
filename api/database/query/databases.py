"""SQL on databases themselves (`python -m api.cli create-database | clean`).

Run on a connection to the maintenance database `postgres` of the primary: a standby
can neither create nor drop a database, and none can be dropped while connected to it.
"""

from __future__ import annotations

import asyncpg


def _quoted(identifier: str) -> str:
    # Identifiers cannot be bound as parameters; quote it the PostgreSQL way.
    return '"' + identifier.replace('"', '""') + '"'


async def database_exists(conn: asyncpg.Connection, *, name: str) -> bool:
    found = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
    return found is not None


async def create_database(conn: asyncpg.Connection, *, name: str) -> None:
    await conn.execute(f"CREATE DATABASE {_quoted(name)}")


async def drop_database(conn: asyncpg.Connection, *, name: str) -> None:
    """Drop `name` if it exists, ending the sessions connected to it."""
    await conn.execute(f"DROP DATABASE IF EXISTS {_quoted(name)} WITH (FORCE)")
