"""Liveness, readiness and metrics for ops; never rate limited."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from api.health import check_dependencies, refresh_scrape_gauges
from api.helpers.orjson_coder import ORJSONResponse
from api.metrics import render_metrics
from api.state import get_state

router = APIRouter(tags=["ops"])

HEALTH_CONTENT_TYPE = "application/health+json"

_LIVE = ORJSONResponse({"status": "pass"}).body


@router.get("/ping", summary="Liveness")
@router.get("/livez", include_in_schema=False)
async def ping() -> Response:
    """Liveness: the process answers; no dependency is touched."""
    return Response(_LIVE, media_type="application/json")


_HEALTH: dict[str, Any] = {"content": {HEALTH_CONTENT_TYPE: {}}}


@router.get(
    "/ping/ready",
    summary="Readiness",
    response_class=Response,
    responses={
        200: {"description": "`pass`, or `warn` when Redis or RabbitMQ is down.", **_HEALTH},
        503: {
            "description": "`fail`: PostgreSQL is down, or RabbitMQ refused the queues.",
            **_HEALTH,
        },
    },
)
@router.get("/readyz", include_in_schema=False)
async def ready(request: Request) -> Response:
    """Readiness: PostgreSQL down is `fail` (503); Redis or RabbitMQ down is `warn` (200).

    RabbitMQ refusing the queues' arguments (a misconfiguration) is `fail` (503).
    """
    status, checks = await check_dependencies(get_state(request))
    body = {"status": status, "checks": checks}
    return ORJSONResponse(
        body,
        status_code=503 if status == "fail" else 200,
        media_type=HEALTH_CONTENT_TYPE,
        headers={"Cache-Control": "no-store"},
    )


@router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus text exposition; readiness, backlog and dead-letter gauges measured now."""
    await refresh_scrape_gauges(get_state(request))
    payload, content_type = render_metrics()
    return Response(payload, media_type=content_type)
