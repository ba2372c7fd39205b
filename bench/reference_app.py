"""The reference the service is measured against: bare FastAPI endpoints, raw asyncpg.

Served like the service (uvicorn, uvloop, httptools, no access log, same worker
count) by `python -m bench.reference_app --port P --workers N`, against the
throw-away database of the run (POSTGRES_* from the environment):

- `GET /json`: a small JSON object, no I/O (the ceiling for any endpoint);
- `POST /insert`: the request body stored by one single-row INSERT in a transaction;
- `GET /select/{id}`: one primary-key SELECT, returned as JSON.
"""

from __future__ import annotations

import argparse
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import orjson
import uvicorn
from fastapi import FastAPI, Request, Response

from api.configs import Settings, load_settings
from bench.serve import install

TABLE = "bench_reference"
CREATE_TABLE = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    payload jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
)
"""
INSERT = f"INSERT INTO {TABLE} (payload) VALUES ($1::jsonb) RETURNING id, created_at"
SELECT = f"SELECT id, payload::text, created_at FROM {TABLE} WHERE id = $1"
JSON = "application/json"


def asyncpg_dsn(settings: Settings) -> str:
    """The service's PostgreSQL URL, in the form asyncpg takes."""
    url = settings.postgres_url().set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


async def create_reference_table(
    conn: asyncpg.Connection, *, rows: int, payload: bytes
) -> list[str]:
    """Create the table (before the app starts, so workers never race on DDL); seed `rows`."""
    await conn.execute(CREATE_TABLE)
    records = await conn.fetch(
        f"INSERT INTO {TABLE} (payload) SELECT $1::jsonb FROM generate_series(1, $2) RETURNING id",
        payload.decode(),
        rows,
    )
    return [str(record["id"]) for record in records]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = load_settings()
    # The service's pool can grow to POOL_SIZE + MAX_OVERFLOW connections; so can this one.
    app.state.pool = await asyncpg.create_pool(
        asyncpg_dsn(settings),
        min_size=1,
        max_size=settings.POSTGRES_POOL_SIZE + settings.POSTGRES_MAX_OVERFLOW,
        # Idle connections go quickly: the service's pools share PostgreSQL's slots with it.
        max_inactive_connection_lifetime=1.0,
    )
    try:
        yield
    finally:
        await app.state.pool.close()


def create_app() -> FastAPI:
    """A FastAPI app with no middleware, no validation beyond the path, no logging."""
    app = FastAPI(lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/json")
    async def bare_json() -> Response:
        return Response(orjson.dumps({"status": "ok", "service": "reference"}), media_type=JSON)

    @app.post("/insert", status_code=201)
    async def insert_row(request: Request) -> Response:
        body = await request.body()
        async with request.app.state.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(INSERT, body.decode())
        content = orjson.dumps({"id": str(row["id"]), "created_at": row["created_at"]})
        return Response(content, status_code=201, media_type=JSON)

    @app.get("/select/{row_id}")
    async def select_row(row_id: uuid.UUID, request: Request) -> Response:
        async with request.app.state.pool.acquire() as conn:
            row = await conn.fetchrow(SELECT, row_id)
        if row is None:
            return Response(b'{"detail":"not found"}', status_code=404, media_type=JSON)
        content = orjson.dumps(
            {
                "id": str(row["id"]),
                "payload": orjson.Fragment(row["payload"]),
                "created_at": row["created_at"],
            }
        )
        return Response(content, media_type=JSON)

    # The bench's loop-lag sampler, as in the service (`bench/serve.py`), when asked for.
    return install(app)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.reference_app", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    uvicorn.run(
        "bench.reference_app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
