"""The skeleton over HTTP: problem+json, request ids, body limit, CORS, probes.

Configuration that stops startup is tested without services in tests/unit/test_configs.py.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.configs import Settings
from tests.factories import TestUser, make_order, make_user
from tests.problems import assert_problem
from tests.services import rabbitmq_stopped, redis_stopped


async def test_ping_answers_pass(client: httpx.AsyncClient) -> None:
    for path in ("/ping", "/livez"):
        response = await client.get(path)
        assert response.status_code == 200
        assert response.json() == {"status": "pass"}


async def test_ready_passes_with_every_dependency_up(client: httpx.AsyncClient) -> None:
    response = await client.get("/ping/ready")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/health+json")
    body = response.json()
    assert body["status"] == "pass", body
    assert set(body["checks"]) == {"postgres", "redis", "rabbitmq"}
    for check in body["checks"].values():
        assert check["status"] == "pass"
        assert isinstance(check["latency_ms"], float | int)


async def test_unknown_route_is_problem_404(client: httpx.AsyncClient) -> None:
    body = assert_problem(await client.get("/v1/nothing-here"), 404, "not-found")
    assert body["title"] == "Not Found"
    assert body["instance"] == "/v1/nothing-here"


async def test_wrong_method_is_problem_405(client: httpx.AsyncClient) -> None:
    response = await client.request("TRACE", "/ping")
    assert_problem(response, 405, "method-not-allowed")
    assert "GET" in response.headers["allow"]


async def test_request_id_is_echoed_when_valid(client: httpx.AsyncClient) -> None:
    response = await client.get("/ping", headers={"X-Request-ID": "abc.DEF-123:x_y"})
    assert response.headers["x-request-id"] == "abc.DEF-123:x_y"


async def test_generated_request_ids_are_distinct_version_4_uuids(
    client: httpx.AsyncClient,
) -> None:
    answers = await asyncio.gather(*(client.get("/ping") for _ in range(200)))
    ids = {answer.headers["x-request-id"] for answer in answers}
    assert len(ids) == 200
    assert {uuid.UUID(request_id).version for request_id in ids} == {4}
    assert {uuid.UUID(request_id).variant for request_id in ids} == {uuid.RFC_4122}


async def test_body_over_one_mebibyte_is_413(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/anything", content=b"x" * (1024 * 1024 + 1), headers={"Content-Type": "text/plain"}
    )
    assert_problem(response, 413, "payload-too-large")


async def test_streamed_body_over_limit_without_length_is_413(
    client: httpx.AsyncClient, user: TestUser
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(17):  # 17 x 64 KiB: one chunk past 1 MiB
            yield b"x" * 65536

    # A route that reads a body, as an authorised caller: only the size can refuse it.
    response = await client.post(
        "/v1/orders",
        content=chunks(),
        headers={**user.headers, "Content-Type": "application/json"},
    )
    assert "content-length" not in response.request.headers  # chunked: counted as it arrives
    assert_problem(response, 413, "payload-too-large")


async def test_cors_preflight_allows_the_contract_headers(client: httpx.AsyncClient) -> None:
    response = await client.options(
        "/ping",
        headers={
            "Origin": "http://storefront.test",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "Authorization, Idempotency-Key, If-Match",
        },
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "http://storefront.test"
    allowed = response.headers["access-control-allow-headers"].lower()
    for header in (
        "authorization",
        "content-type",
        "idempotency-key",
        "if-match",
        "if-none-match",
        "x-request-id",
    ):
        assert header in allowed


async def test_cors_refuses_unknown_origin_with_a_problem(client: httpx.AsyncClient) -> None:
    response = await client.options(
        "/ping",
        headers={"Origin": "http://evil.test", "Access-Control-Request-Method": "GET"},
    )
    assert "access-control-allow-origin" not in response.headers
    # Every error is problem+json, a refused preflight too (it was Starlette's plain text).
    body = assert_problem(response, 400, "bad-request")
    assert body["detail"] == "Disallowed CORS origin"
    assert body["instance"] == "/ping"


async def test_every_request_logs_one_json_line(
    client: httpx.AsyncClient, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    capsys.readouterr()
    await client.get("/ping", headers={"X-Request-ID": "log-line-check"})
    lines = [
        json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")
    ]
    request_lines = [line for line in lines if line.get("request_id") == "log-line-check"]
    assert len(request_lines) == 1
    line = request_lines[0]
    for field in ("timestamp", "level", "message", "method", "path", "status", "duration_ms"):
        assert field in line
    assert line["status"] == 200
    assert line["path"] == "/ping"


async def test_metrics_are_prometheus_text(client: httpx.AsyncClient) -> None:
    await client.get("/ping")
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert 'http_requests_total{method="GET",route="/ping",status="200"}' in response.text


async def _ready(app: FastAPI) -> httpx.Response:
    async with LifespanManager(app, startup_timeout=30) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/ping")).status_code == 200
            return await client.get("/ping/ready")


async def test_ready_fails_503_when_postgres_is_unreachable(
    app_factory: Callable[..., FastAPI],
) -> None:
    response = await _ready(app_factory(POSTGRES_PORT=1, POSTGRES_CONNECT_TIMEOUT=0.5))
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "fail"
    assert body["checks"]["postgres"]["status"] == "fail"


@pytest.mark.faults
async def test_ready_warns_when_redis_is_down(app_factory: Callable[..., FastAPI]) -> None:
    async with redis_stopped():
        response = await _ready(app_factory())
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "warn"
    assert body["checks"]["redis"]["status"] == "fail"
    assert body["checks"]["postgres"]["status"] == "pass"


@pytest.mark.faults
async def test_ready_warns_when_rabbitmq_is_down(app_factory: Callable[..., FastAPI]) -> None:
    async with rabbitmq_stopped():
        response = await _ready(app_factory())
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "warn"
    assert body["checks"]["rabbitmq"]["status"] == "fail"


async def test_query_over_the_transaction_timeout_is_503(
    app_factory: Callable[..., FastAPI],
    sessionmaker: async_sessionmaker[AsyncSession],
    settings: Settings,
) -> None:
    """A row held by another transaction makes the cancel wait past statement_timeout."""
    user = await make_user(sessionmaker, settings)
    app = app_factory(POSTGRES_TRANSACTION_TIMEOUT=0.5)
    async with LifespanManager(app, startup_timeout=30) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            order = await make_order(client, user)
            async with sessionmaker() as session, session.begin():
                await session.execute(
                    text("SELECT 1 FROM orders WHERE id = :id FOR UPDATE"), {"id": order["id"]}
                )
                started = time.perf_counter()
                blocked = await client.post(
                    f"/v1/orders/{order['id']}/cancel", headers=user.headers
                )
                waited = time.perf_counter() - started
            after = await client.post(f"/v1/orders/{order['id']}/cancel", headers=user.headers)
    assert_problem(blocked, 503, "service-unavailable")
    assert "Traceback" not in blocked.text
    assert waited < 0.5 + 1.0
    assert after.status_code == 200
