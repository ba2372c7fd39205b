"""Another client of the PgBouncer under test: `python -m tests.pgbouncer_client`.

Runs the kinds of transaction the service runs (SQLAlchemy session transactions with a
transaction-scoped advisory lock and SET LOCAL, single statements on a raw connection)
in a loop, so PgBouncer's few server connections pass between this process and the
service's. Exits non-zero on the first error: session state left behind on a server
connection (a named prepared statement, a session lock or setting) would surface here
or in the tests as such an error.
"""

from __future__ import annotations

import asyncio
import random
import sys

from sqlalchemy import text

from api.configs import load_settings
from api.database.connection import create_engine, raw_connection

CONCURRENCY = 4
PAUSE_SECONDS = 0.02


async def _loop(engine_index: int) -> None:
    settings = load_settings()
    engine = create_engine(settings)
    try:
        while True:
            async with engine.begin() as conn:
                key = random.randrange(1 << 30)
                await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
                await conn.execute(text("SET LOCAL statement_timeout = '2s'"))
                await conn.execute(text("SELECT count(*) FROM orders"))
            async with raw_connection(engine) as raw:
                await raw.fetchval("SELECT count(*) FROM outbox WHERE id > $1", engine_index)
            await asyncio.sleep(PAUSE_SECONDS)
    finally:
        await engine.dispose()


async def main() -> None:
    await asyncio.gather(*(_loop(index) for index in range(CONCURRENCY)))


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
