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
from fastapi.routing import iter_route_contexts
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from api import docs, openapi
from api.configs import Settings, get_settings
from api.database.connection import create_engine, create_sessionmaker
from api.errors import (
    PROBLEM_CONTENT_TYPE,
    SLUG_BY_STATUS,
    ProblemError,
    ServiceUnavailable,
    ValidationFailed,
    malformed_json,
    problem_body,
    problem_instance,
)
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


def _problem(request: Request, exc: ProblemError | StarletteHTTPException) -> Response:
    status = exc.status_code
    slug = exc.slug if isinstance(exc, ProblemError) else SLUG_BY_STATUS.get(status, "bad-request")
    body = problem_body(
        status=status,
        slug=slug,
        detail=str(exc.detail),
        instance=problem_instance(request.scope),
        request_id=request.scope.get("state", {}).get("request_id"),
        errors=exc.errors if isinstance(exc, ProblemError) else None,
    )
    return ORJSONResponse(
        body, status_code=status, headers=exc.headers, media_type=PROBLEM_CONTENT_TYPE
    )


def allowed_methods(request: Request) -> str:
    """Every method the routes at this path serve, not only the first route's (RFC 9110 §15.5.6)."""
    path = request.scope["path"]
    methods: set[str] = set()
    for route in iter_route_contexts(request.app.routes):
        regex = getattr(route, "path_regex", None)
        if route.methods and regex is not None and regex.match(path):
            methods |= route.methods
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
    return _problem(request, exc)


def _sent_json(request: Request) -> bool:
    return is_json_media_type(request.headers.get("content-type", ""))


async def handle_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            loc = err.get("loc", ())
            where = f" at byte {loc[1]}" if len(loc) > 1 else ""
            reason = str(err.get("ctx", {}).get("error", "")) + where
            return _problem(request, malformed_json(reason.strip() or None))
    errors = [
        {"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
        for err in exc.errors()
    ]
    problem = ValidationFailed("The request is not valid.", errors=errors)
    return _problem(request, problem)


async def handle_unavailable(request: Request, exc: Exception) -> Response:
    """A dependency that cannot be reached or timed out: 503, never a 500 with a trace."""
    logger.warning("dependency unavailable", extra={"error": type(exc).__name__})
    return _problem(request, ServiceUnavailable("A backing service is unavailable; retry shortly."))


# PostgreSQL answers that mean "not now" rather than "your request is wrong".
_UNAVAILABLE_CAUSES = (
    asyncpg.PostgresConnectionError,  # admin shutdown, cannot connect now, too many clients
    asyncpg.InterfaceError,
    asyncpg.OperatorInterventionError,  # statement_timeout, admin shutdown
    asyncpg.InsufficientResourcesError,
    # A write on a node that is no longer the primary (demoted or fenced); the
    # connection is dropped and the next one goes to the primary of POSTGRES_HOSTS.
    asyncpg.ReadOnlySQLTransactionError,
    OSError,
    TimeoutError,
)


def _is_unavailable(exc: sa_exc.DBAPIError) -> bool:
    if exc.connection_invalidated or isinstance(
        exc, sa_exc.OperationalError | sa_exc.InterfaceError
    ):
        return True
    cause: BaseException | None = exc.orig
    while cause is not None:
        if isinstance(cause, _UNAVAILABLE_CAUSES):
            return True
        cause = cause.__cause__
    return False


async def handle_database_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, sa_exc.DBAPIError)
    if _is_unavailable(exc):
        return await handle_unavailable(request, exc)
    raise exc


async def handle_raw_database_error(request: Request, exc: Exception) -> Response:
    """The same judgement for asyncpg's own errors (statements on a `raw_connection`)."""
    if isinstance(exc, _UNAVAILABLE_CAUSES):
        return await handle_unavailable(request, exc)
    raise exc


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

    app.add_exception_handler(StarletteHTTPException, handle_http_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(sa_exc.DBAPIError, handle_database_error)
    app.add_exception_handler(asyncpg.PostgresError, handle_raw_database_error)
    app.add_exception_handler(asyncpg.InterfaceError, handle_raw_database_error)
    app.add_exception_handler(sa_exc.TimeoutError, handle_unavailable)
    app.add_exception_handler(RabbitUnavailable, handle_unavailable)
    app.add_exception_handler(ConnectionError, handle_unavailable)
    app.add_exception_handler(TimeoutError, handle_unavailable)

    # The routers' routes join the app's own table. `include_router` would add each router
    # as a view that works out its routes' combined context on every request: a fifth of
    # the cost of `/ping` (measured in-process, 82 vs 62 us). Our routers carry their
    # prefix, tags and dependencies themselves, so there is nothing to combine.
    for router in (
        ping.router,
        orders.router,
        auth.router,
        rate_limits.router,
        redirect.router,
        events.router,
    ):
        app.router.routes.extend(router.routes)
    check_json_body_routes(app.routes)
    openapi.install(app)
    docs.install(app)
    instrument_app(app)
    return app
