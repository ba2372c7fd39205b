"""API4:2023 Unrestricted Resource Consumption: every request is bounded in size, work and rate."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import httpx
import orjson
import pytest
from fastapi import FastAPI

from tests.factories import TestUser, order_payload
from tests.problems import assert_problem
from tests.security.helpers import error_locs, fresh_app, serve

MIB = 1024 * 1024


def oversized_order() -> bytes:
    """A syntactically valid order body just over 1 MiB."""
    body = orjson.dumps(order_payload(metadata={"note": "x" * MIB}))
    assert len(body) > MIB
    return body


async def test_api4_resource_consumption_body_over_one_mebibyte_is_413(
    client: httpx.AsyncClient, user: TestUser
) -> None:
    headers = {**user.headers, "Content-Type": "application/json"}
    response = await client.post("/v1/orders", content=oversized_order(), headers=headers)
    assert_problem(response, 413, "payload-too-large")

    async def chunks() -> AsyncIterator[bytes]:
        body = oversized_order()
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    # Without Content-Length the cap is enforced while reading, not trusted from a header.
    streamed = await client.post("/v1/orders", content=chunks(), headers=headers)
    assert "content-length" not in streamed.request.headers
    assert_problem(streamed, 413, "payload-too-large")
    page = (await client.get("/v1/orders", headers=user.headers)).json()
    assert page["items"] == []


@pytest.mark.parametrize("limit", ["0", "101", "1000000", "-1"])
async def test_api4_resource_consumption_page_size_is_bounded(
    client: httpx.AsyncClient, user: TestUser, limit: str
) -> None:
    response = await client.get("/v1/orders", params={"limit": limit}, headers=user.headers)
    assert_problem(response, 422, "validation-error")
    assert ["query", "limit"] in error_locs(response)


async def test_api4_resource_consumption_item_count_and_sizes_are_bounded(
    client: httpx.AsyncClient, user: TestUser
) -> None:
    item = {"sku": "SKU-1", "quantity": 1, "unit_price": 1}
    too_many = order_payload(items=[{**item, "sku": f"S{i}"} for i in range(101)])
    cases = {
        ("body", "items"): too_many,
        ("body", "metadata"): order_payload(metadata={f"k{i}": "v" for i in range(21)}),
        ("body", "items", 0, "quantity"): order_payload(items=[{**item, "quantity": 10_001}]),
    }
    for loc, body in cases.items():
        response = await client.post("/v1/orders", json=body, headers=user.headers)
        assert_problem(response, 422, "validation-error")
        assert list(loc) in error_locs(response)
    # argon2 work is bounded too: an enormous password is refused before it is hashed.
    register = await client.post(
        "/v1/auth/register", json={"email": "big@example.com", "password": "x" * 1025}
    )
    assert_problem(register, 422, "validation-error")


async def test_api4_resource_consumption_a_flood_is_429_with_retry_after(
    app_factory: Callable[..., FastAPI], user: TestUser
) -> None:
    async with serve(fresh_app(app_factory, RATE_LIMIT_DEFAULT="5/60")) as client:
        statuses = [
            (await client.get("/v1/orders", headers=user.headers)).status_code for _ in range(5)
        ]
        assert statuses == [200] * 5
        for path in ("/v1/orders", "/v1/auth/me", f"/v1/orders/{user.id}"):
            flood = await client.get(path, headers=user.headers)
            assert_problem(flood, 429, "rate-limited")
            assert 1 <= int(flood.headers["retry-after"]) <= 60
            assert flood.headers["ratelimit"].startswith('"default";r=0;')
        # The health probes stay reachable while the API refuses the flood.
        assert (await client.get("/ping")).status_code == 200
