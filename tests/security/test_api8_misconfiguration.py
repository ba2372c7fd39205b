"""API8:2023 Security Misconfiguration: no internals in errors, no open CORS, no stray methods."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import httpx
import pytest
from fastapi import FastAPI
from pydantic import ValidationError
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.configs import describe_error
from api.models import Order
from tests.conftest import run_settings
from tests.factories import TestUser
from tests.problems import PROBLEM_KEYS, assert_problem
from tests.security.helpers import fresh_app, serve

# What a stack trace, an SQL error or a library message would leave in a body.
LEAKS = (
    "Traceback",
    'File "',
    "line ",
    "sqlalchemy",
    "asyncpg",
    "pydantic",
    "SELECT ",
    "INSERT ",
    "UPDATE ",
    " FROM ",
    "WHERE ",
    "psql",
    "postgres",
    "redis",
    "amqp",
    "Exception",
    "Error:",
)
STRONG_SECRET = "s" * 48


def assert_no_internals(response: httpx.Response) -> None:
    assert response.status_code != 500 or response.json()["type"].endswith("internal-error")
    body = response.json()
    assert set(body) - {"errors"} == PROBLEM_KEYS, body
    for leak in LEAKS:
        assert leak.lower() not in response.text.lower(), (leak, response.text)


def hostile_requests(user: TestUser, order_id: str) -> list[tuple[str, str, dict[str, object]]]:
    """Requests built to break parsers, queries and encoders; all must end in a clean 4xx."""
    auth = user.headers
    json_auth = {**auth, "Content-Type": "application/json"}
    return [
        (
            "POST",
            "/v1/orders",
            {"content": b'{"currency": "EUR", "items": [', "headers": json_auth},
        ),
        ("POST", "/v1/orders", {"content": b"\xff\xfe\x00garbage", "headers": json_auth}),
        ("POST", "/v1/orders", {"content": b"[]", "headers": json_auth}),
        ("POST", "/v1/orders", {"content": b"1e999999", "headers": json_auth}),
        (
            "POST",
            "/v1/orders",
            {
                "content": b'{"currency": "EUR", "items": [{"sku": "A", '
                b'"quantity": 1e400, "unit_price": 1}]}',
                "headers": json_auth,
            },
        ),
        (
            "POST",
            "/v1/orders",
            {
                "json": {
                    "currency": "EUR",
                    "items": [{"sku": "A", "quantity": 1, "unit_price": 1, "name": "nul\x00byte"}],
                },
                "headers": auth,
            },
        ),
        (
            "POST",
            "/v1/orders",
            {
                "json": {
                    "currency": "EUR",
                    "metadata": {"k\x00": "v"},
                    "items": [{"sku": "A", "quantity": 1, "unit_price": 1}],
                },
                "headers": auth,
            },
        ),
        (
            "POST",
            "/v1/orders",
            {
                "json": {
                    "currency": "EUR",
                    "items": [{"sku": "A", "quantity": 2**70, "unit_price": 1}],
                },
                "headers": auth,
            },
        ),
        (
            "POST",
            "/v1/orders",
            {"json": {"currency": "EUR'; DROP TABLE orders; --", "items": []}, "headers": auth},
        ),
        (
            "POST",
            "/v1/auth/register",
            {"json": {"email": "a@example.com", "password": "p" * 10, "name": "\x00"}},
        ),
        ("POST", "/v1/auth/login", {"json": {"email": "' OR 1=1 --@x.com", "password": "x"}}),
        (
            "POST",
            "/v1/auth/token",
            {
                "content": b"username=%00&password=%ff",
                "headers": {"Content-Type": "application/x-www-form-urlencoded"},
            },
        ),
        ("POST", "/v1/auth/refresh", {"json": {"refresh_token": "\x00' OR '1'='1"}}),
        ("GET", "/v1/orders", {"params": {"status": "pending' OR '1'='1"}, "headers": auth}),
        (
            "GET",
            "/v1/orders",
            {"params": {"cursor": "' UNION SELECT * FROM users --"}, "headers": auth},
        ),
        ("GET", "/v1/orders", {"params": {"user_id": "1 OR 1=1"}, "headers": auth}),
        ("GET", "/v1/orders/1%20OR%201=1", {"headers": auth}),
        ("GET", f"/v1/orders/{order_id}", {"headers": {**auth, "If-None-Match": "\x7f" * 300}}),
        (
            "PATCH",
            f"/v1/orders/{order_id}",
            {"json": {"status": "paid"}, "headers": {**auth, "If-Match": '"x" ' * 500}},
        ),
        (
            "POST",
            "/v1/orders",
            {
                "json": {
                    "currency": "EUR",
                    "items": [{"sku": "A", "quantity": 1, "unit_price": 1}],
                },
                "headers": {**auth, "Idempotency-Key": "\u00e9\u00e9".encode("latin-1")},
            },
        ),
        ("GET", "/v1/orders", {"headers": {"Authorization": "Bearer " + "A" * 8000}}),
    ]


async def test_api8_misconfiguration_hostile_input_gets_a_clean_problem_never_a_trace(
    client: httpx.AsyncClient, user: TestUser
) -> None:
    order_id = str(uuid.uuid4())
    for method, path, kwargs in hostile_requests(user, order_id):
        response = await client.request(method, path, **kwargs)
        assert 400 <= response.status_code < 500, (method, path, kwargs, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
        assert_no_internals(response)


async def test_api8_misconfiguration_a_real_internal_error_is_a_bare_500_problem(
    client: httpx.AsyncClient, sessionmaker: async_sessionmaker[AsyncSession], user: TestUser
) -> None:
    """A row that no longer fits the model (bad data, not a mock) faults the cancel path."""
    order_id = uuid.uuid4()
    async with sessionmaker() as session, session.begin():
        await session.execute(
            insert(Order).values(
                id=order_id,
                user_id=user.id,
                currency="EUR",
                items=[{"sku": "SKU-1"}],  # no quantity, prices or line total
                total_amount=0,
            )
        )
    response = await client.post(f"/v1/orders/{order_id}/cancel", headers=user.headers)
    body = assert_problem(response, 500, "internal-error")
    assert body["detail"] == "An unexpected error occurred."
    assert_no_internals(response)
    assert "SKU-1" not in response.text
    assert "quantity" not in response.text
    # The failed request's transaction was rolled back: nothing half-applied.
    async with sessionmaker() as session:
        query = select(Order.status, Order.version).where(Order.id == order_id)
        row = (await session.execute(query)).one()
    assert tuple(row) == ("pending", 1)


async def test_api8_misconfiguration_unsupported_methods_are_405_with_the_real_allow_list(
    client: httpx.AsyncClient, user: TestUser
) -> None:
    # Every GET route also answers HEAD (RFC 9110 §9.3.2), so the list names it.
    cases = {
        "/ping": "GET, HEAD",
        "/v1/orders": "GET, HEAD, POST",
        f"/v1/orders/{uuid.uuid4()}": "GET, HEAD, PATCH",
        "/v1/auth/me": "GET, HEAD",
        "/v1/redirect/svc/x": "DELETE, GET, HEAD, PATCH, POST, PUT",
        "/v1/auth/login": "POST",
    }
    for path, allow in cases.items():
        for method in ("TRACE", "CONNECT", "PROPFIND"):
            response = await client.request(method, path, headers=user.headers)
            assert_problem(response, 405, "method-not-allowed")
            assert response.headers["allow"] == allow, (method, path)


async def test_api8_misconfiguration_wildcard_cors_never_allows_credentials(
    app_factory: Callable[..., FastAPI], user: TestUser
) -> None:
    app = fresh_app(app_factory, ENV_ALLOWED_ORIGINS="*")
    async with serve(app) as client:
        preflight = await client.options(
            "/v1/orders",
            headers={
                "Origin": "https://evil.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization",
            },
        )
        simple = await client.get(
            "/v1/orders",
            headers={**user.headers, "Origin": "https://evil.example", "Cookie": "sid=1"},
        )
    for response in (preflight, simple):
        assert "access-control-allow-origin" in response.headers
        assert response.headers.get("access-control-allow-credentials") != "true"


async def test_api8_misconfiguration_listed_origins_only_get_credentials(
    client: httpx.AsyncClient, user: TestUser
) -> None:
    listed = await client.get(
        "/v1/orders", headers={**user.headers, "Origin": "http://storefront.test"}
    )
    assert listed.headers["access-control-allow-origin"] == "http://storefront.test"
    assert listed.headers["access-control-allow-credentials"] == "true"
    other = await client.get(
        "/v1/orders", headers={**user.headers, "Origin": "https://evil.example"}
    )
    # No Allow-Origin naming it: no browser hands this response to that origin.
    assert "access-control-allow-origin" not in other.headers


def test_api8_misconfiguration_production_refuses_a_wildcard_origin() -> None:
    with pytest.raises(ValidationError) as refused:
        run_settings(APP_ENV="production", JWT_SECRET_KEY=STRONG_SECRET, ENV_ALLOWED_ORIGINS="*")
    line = describe_error(refused.value)
    assert "ENV_ALLOWED_ORIGINS" in line
    assert STRONG_SECRET not in line
    accepted = run_settings(
        APP_ENV="production",
        JWT_SECRET_KEY=STRONG_SECRET,
        ENV_ALLOWED_ORIGINS="https://shop.example",
    )
    assert accepted.ENV_ALLOWED_ORIGINS == ["https://shop.example"]
