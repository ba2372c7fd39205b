"""Liveness, readiness and metrics for ops; never rate limited."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from sqlalchemy import text

from api.database.connection import connected_node
from api.helpers.orjson_coder import ORJSONResponse
from api.metrics import render_metrics
from api.relay.notifications import listen_state
from api.state import get_state

router = APIRouter(tags=["ops"])

PROBE_TIMEOUT = 1.0
HEALTH_CONTENT_TYPE = "application/health+json"

Status = Literal["pass", "warn", "fail"]

_LIVE = ORJSONResponse({"status": "pass"}).body


@router.get("/ping", summary="Liveness")
@router.get("/livez", include_in_schema=False)
async def ping() -> Response:
    """Liveness: the process answers; no dependency is touched."""
    return Response(_LIVE, media_type="application/json")


async def _probe(check: Callable[[], Awaitable[dict[str, Any] | None]]) -> dict[str, Any]:
    started = time.perf_counter()
    extra: dict[str, Any] | None = None
    try:
        extra = await asyncio.wait_for(check(), PROBE_TIMEOUT)
    except TimeoutError:
        outcome: dict[str, Any] = {"status": "fail", "detail": f"no answer within {PROBE_TIMEOUT}s"}
    except Exception as exc:  # a probe reports any failure instead of raising it
        outcome = {"status": "fail", "detail": type(exc).__name__}
    else:
        outcome = {"status": "pass", **(extra or {})}
    outcome["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
    return outcome


_HEALTH: dict[str, Any] = {"content": {HEALTH_CONTENT_TYPE: {}}}


@router.get(
    "/ping/ready",
    summary="Readiness",
    response_class=Response,
    responses={
        200: {"description": "`pass`, or `warn` when Redis or RabbitMQ is down.", **_HEALTH},
        503: {"description": "`fail`: PostgreSQL is down.", **_HEALTH},
    },
)
@router.get("/readyz", include_in_schema=False)
async def ready(request: Request) -> Response:
    """Readiness: PostgreSQL down is `fail` (503); Redis or RabbitMQ down is `warn` (200)."""
    state = get_state(request)

    async def postgres() -> dict[str, Any]:
        async with state["engine"].connect() as conn:
            await conn.execute(text("SELECT 1"))
            raw = await conn.get_raw_connection()
            # The node of POSTGRES_HOSTS (or the pooler) this process writes to, and whether
            # its relay is woken by LISTEN or (degraded) only polls.
            extra: dict[str, Any] = {"host": str(connected_node(raw.driver_connection))}
            if (listen := listen_state()) is not None:
                extra["relay_wakeup"] = listen
            return extra

    async def redis() -> None:
        await state["redis"].ping()

    async def rabbitmq() -> None:
        if not state["rabbit"].is_connected:
            raise ConnectionError("not connected")

    pg, rd, mq = await asyncio.gather(_probe(postgres), _probe(redis), _probe(rabbitmq))
    status: Status = "pass"
    if rd["status"] == "fail" or mq["status"] == "fail":
        status = "warn"
    if pg["status"] == "fail":
        status = "fail"
    body = {"status": status, "checks": {"postgres": pg, "redis": rd, "rabbitmq": mq}}
    return ORJSONResponse(
        body,
        status_code=503 if status == "fail" else 200,
        media_type=HEALTH_CONTENT_TYPE,
        headers={"Cache-Control": "no-store"},
    )


@router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def metrics() -> Response:
    """Prometheus text exposition."""
    payload, content_type = render_metrics()
    return Response(payload, media_type=content_type)
