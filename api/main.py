"""The app factory and its lifespan."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from api import docs, openapi
from api.configs import Settings, get_settings
from api.database.connection import create_engine, create_sessionmaker, is_database_outage
from api.errors import ServiceUnavailable, ValidationFailed, malformed_json, problem_response
from api.event_workers import EventWorkers
from api.helpers.logger import configure_logging
from api.helpers.orjson_coder import ORJSONResponse
from api.media_types import check_json_body_routes, is_json_media_type
from api.middleware import ProblemCORSMiddleware, RequestContextMiddleware
from api.rabbit_core.client import RabbitClient, RabbitUnavailable
from api.rabbit_core.rpc import RpcClient
from api.redis_core.layer import open_redis_layer
from api.routers import auth, events, orders, ping, rate_limits, redirect
from api.schemas.orders import OrderRead
from api.services.retention_sweeper import RetentionSweeper
from api.state import AppState
from api.tracing import instrument_app, setup_tracing, shutdown_tracing

logger = logging.getLogger(__name__)

# The youngest generation's collection threshold: net allocations of tracked objects
# (Python's default, 700, is crossed by the objects of a few dozen requests in flight, so
# a worker collected about 600 times a second). Issue 18, `make bench`: the cached GET
# went from 670-750 ms of GC per 6 s round (53-59 full collections) to none in the window,
# 11,189 to 12,527 req/s, p99 10.6 to 9.2 ms; `make bench SOAK=…` watches the RSS.
GC_YOUNG_THRESHOLD = 10_000

CORS_ALLOW_HEADERS = [
    "Authorization",
    "Content-Type",
    "Idempotency-Key",
    "If-Match",
    "If-None-Match",
    "X-Request-ID",
]
CORS_EXPOSE_HEADERS = [
    "X-Request-ID",
    "ETag",
    "Location",
    "Idempotent-Replayed",
    "X-Cache",
    "RateLimit",
    "RateLimit-Policy",
    "Retry-After",
]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[AppState]:
    """Open PostgreSQL, Redis and RabbitMQ clients; close them in reverse order.

    Nothing here waits for a dependency to answer: the process serves `/ping`
    while one is down and reports it through `/ping/ready`.
    """
    settings: Settings = app.state.settings
    engine = create_engine(settings)
    redis = open_redis_layer(settings)
    redis.start()
    rabbit = RabbitClient(settings)
    await rabbit.start()
    rpc = RpcClient(rabbit)
    await rpc.start()
    sessionmaker = create_sessionmaker(engine)
    retention_sweeper = RetentionSweeper(sessionmaker)
    retention_sweeper.start()
    cache = redis.cache

    async def invalidate_cache(order: OrderRead) -> None:
        await cache.invalidate(order.user_id, order.id)

    # Status changes from processors make cached reads stale like API writes do.
    event_workers = EventWorkers(settings, sessionmaker, rabbit, on_status_applied=invalidate_cache)
    await event_workers.start()
    # What start-up built (modules, routes, models, pools) lives as long as the process:
    # frozen, a full collection no longer walks it. Issue 18, `make bench`: the cached
    # GET's longest GC pause went from 220-370 ms to 12-27 ms and its p99 from 300-320 ms
    # to 30-54 ms (BENCH_GC_FREEZE=0 measures it without).
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD)
    try:
        yield AppState(
            settings=settings,
            engine=engine,
            sessionmaker=sessionmaker,
            redis=redis.client,
            rabbit=rabbit,
            rpc=rpc,
            limiter=redis.limiter,
            cache=cache,
            trusted_proxies=settings.trusted_proxy_networks,
        )
    finally:
        # First: the relay finishes its batch, the status consumer its in-flight messages.
        await event_workers.stop()
        await retention_sweeper.close()
        await rpc.close()
        await rabbit.close()
        await redis.close()
        await engine.dispose()
        shutdown_tracing()
        # An app started again in this process (the tests do) starts from a clean slate.
        gc.unfreeze()


def allowed_methods(request: Request) -> str:
    """Every method the routes at this path serve, not only the first route's (RFC 9110 §15.5.6)."""
    path = request.scope["path"]
    methods: set[str] = set()
    for route in request.app.routes:  # one flat table: see `create_app`
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(path):
            methods |= getattr(route, "methods", None) or set()
    if "GET" in methods:
        methods.add("HEAD")  # every GET route answers HEAD (the middleware serves it)
    return ", ".join(sorted(methods))


async def handle_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 405:
        headers = {**(exc.headers or {}), "Allow": allowed_methods(request)}
        exc = StarletteHTTPException(405, exc.detail, headers=headers)
    elif exc.status_code == 400 and exc.__cause__ is not None and _sent_json(request):
        # FastAPI answers 400 for a JSON body it could not parse at all (not UTF-8, nested
        # too deep); that is malformed JSON, one 422 shape (SPEC §3).
        reason = "not UTF-8" if isinstance(exc.__cause__, UnicodeDecodeError) else None
        exc = malformed_json(reason)
    return problem_response(request.scope, exc)


def _sent_json(request: Request) -> bool:
    return is_json_media_type(request.headers.get("content-type", ""))


async def handle_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            loc = err.get("loc", ())
            where = f" at byte {loc[1]}" if len(loc) > 1 else ""
            reason = str(err.get("ctx", {}).get("error", "")) + where
            return problem_response(request.scope, malformed_json(reason.strip() or None))
    errors = [
        {"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
        for err in exc.errors()
    ]
    problem = ValidationFailed("The request is not valid.", errors=errors)
    return problem_response(request.scope, problem)


async def handle_unavailable(request: Request, exc: Exception) -> Response:
    """A dependency that cannot be reached or timed out: 503, never a 500 with a trace."""
    logger.warning("dependency unavailable", extra={"error": type(exc).__name__})
    unavailable = ServiceUnavailable("A backing service is unavailable; retry shortly.")
    return problem_response(request.scope, unavailable)


async def handle_database_error(request: Request, exc: Exception) -> Response:
    """PostgreSQL out (`is_database_outage`) is a 503; any other database error a 500."""
    if is_database_outage(exc):
        return await handle_unavailable(request, exc)
    raise exc


# Through SQLAlchemy (sessions, the pool's timeout) and from asyncpg itself (statements
# on a `raw_connection`): one handler judges them all.
DATABASE_ERRORS = (
    sa_exc.DBAPIError,
    sa_exc.TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)
# Not only PostgreSQL's: Redis, RabbitMQ and the pool's own connect failures.
UNAVAILABLE_ERRORS = (RabbitUnavailable, ConnectionError, TimeoutError)

ROUTERS = (
    ping.router,
    orders.router,
    auth.router,
    rate_limits.router,
    redirect.router,
    events.router,
)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the application; tests call it with their own settings."""
    settings = settings or get_settings()
    configure_logging(settings.LOGLEVEL)
    setup_tracing()
    app = FastAPI(
        title="orders-api",
        version="0.1.0",
        summary="Place and track orders; every change is emitted as an event on RabbitMQ.",
        lifespan=lifespan,
        default_response_class=ORJSONResponse,
        # `api.docs` serves the document and both UIs from local assets (SPEC §3).
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        # Metrics are ours (Prometheus); FastAPI's OpenTelemetry hooks would only add a
        # per-request provider lookup.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings

    if settings.ENV_ALLOWED_ORIGINS:
        # With no origin allowed there is nothing to answer a browser with: no layer
        # (and no `Vary: Origin`) on every request.
        app.add_middleware(
            ProblemCORSMiddleware,
            allow_origins=settings.ENV_ALLOWED_ORIGINS,
            allow_credentials="*" not in settings.ENV_ALLOWED_ORIGINS,
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
            allow_headers=CORS_ALLOW_HEADERS,
            expose_headers=CORS_EXPOSE_HEADERS,
            max_age=600,
        )
    # Added last, so it is the outermost: every response, CORS ones included, gets an id.
    app.add_middleware(RequestContextMiddleware)

    # ProblemError is an HTTPException: ours and Starlette's own render the same way.
    app.add_exception_handler(StarletteHTTPException, handle_http_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    for database_error in DATABASE_ERRORS:
        app.add_exception_handler(database_error, handle_database_error)
    for unavailable in UNAVAILABLE_ERRORS:
        app.add_exception_handler(unavailable, handle_unavailable)

    # The routers' routes join the app's own table, like routes declared with `app.get`.
    # `include_router` (FastAPI 0.165) adds a view of each router that matches a request
    # against it twice: measured with `python -m api` under wrk, ~8 us more server CPU
    # per request (/ping 68 -> 77 us, a cached order read 184 -> 191 us; medians of 8
    # alternating runs). Our routers write their prefix, tags, dependencies and route
    # class into each route themselves; tests/test_library_internals.py fails if FastAPI
    # stops doing that, and then this becomes `app.include_router(router)`.
    for router in ROUTERS:
        app.router.routes.extend(router.routes)
    check_json_body_routes(app.routes)
    openapi.install(app)
    docs.install(app)
    instrument_app(app)
    return app
