"""The event worker without the HTTP API: `python -m api.worker`.

Runs the outbox relay, the status consumer and the retention sweep, and serves only
`/livez`, `/readyz` and `/metrics` on `HOST:WORKER_PORT`, so the event side can be
deployed and scaled apart from the API (which then runs with
`OUTBOX_RELAY_ENABLED=false STATUS_CONSUMER_ENABLED=false`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI

from api.configs import Settings, load_settings
from api.database.connection import create_engine, create_sessionmaker
from api.event_workers import EventWorkers
from api.helpers.logger import configure_logging
from api.helpers.orjson_coder import ORJSONResponse
from api.rabbit_core.client import RabbitClient
from api.redis_core.layer import open_redis_layer
from api.routers import ping
from api.schemas.orders import OrderRead
from api.services.retention_sweeper import RetentionSweeper
from api.tracing import setup_tracing, shutdown_tracing

# What the worker serves of the ops routes: liveness, readiness, metrics.
WORKER_PATHS = frozenset({"/livez", "/readyz", "/metrics"})


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    """Open the clients, start relay, consumer and sweep; stop them first on the way out."""
    settings: Settings = app.state.settings
    engine = create_engine(settings)
    sessionmaker = create_sessionmaker(engine)
    redis = open_redis_layer(settings)
    redis.start()
    cache = redis.cache
    rabbit = RabbitClient(settings)
    await rabbit.start()

    async def invalidate_cache(order: OrderRead) -> None:
        await cache.invalidate(order.user_id, order.id)

    # The worker exists to run these two, whatever the API's switches say.
    enabled = settings.model_copy(
        update={"OUTBOX_RELAY_ENABLED": True, "STATUS_CONSUMER_ENABLED": True}
    )
    event_workers = EventWorkers(enabled, sessionmaker, rabbit, on_status_applied=invalidate_cache)
    retention_sweeper = RetentionSweeper(sessionmaker)
    retention_sweeper.start()
    await event_workers.start()
    try:
        # The readiness route reads these keys of the state, as in the API.
        yield {
            "settings": settings,
            "engine": engine,
            "redis": redis.client,
            "limiter": redis.limiter,
            "rabbit": rabbit,
        }
    finally:
        await event_workers.stop()
        await retention_sweeper.close()
        await rabbit.close()
        await redis.close()
        await engine.dispose()
        shutdown_tracing()


def create_worker_app(settings: Settings | None = None) -> FastAPI:
    """The worker's app: its lifespan and the three ops routes, no API."""
    settings = settings or load_settings()
    configure_logging(settings.LOGLEVEL)
    setup_tracing()
    app = FastAPI(
        title="orders-api worker",
        lifespan=lifespan,
        default_response_class=ORJSONResponse,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.settings = settings
    app.router.routes.extend(
        route for route in ping.router.routes if getattr(route, "path", None) in WORKER_PATHS
    )
    return app


def main() -> None:
    settings = load_settings()
    uvicorn.run(
        create_worker_app(settings),
        host=settings.HOST,
        port=settings.WORKER_PORT,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=30,
    )


if __name__ == "__main__":
    main()
