"""API6:2023 Unrestricted Access to Sensitive Business Flows: the order flow cannot be abused.

Replays cannot create a second order or rewrite the first, a state cannot be entered
twice or rewound, and placing orders is limited per user.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import httpx
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.event_helpers import outbox_event_count, read_order
from tests.factories import TestUser, make_order, order_payload
from tests.problems import assert_problem
from tests.security.helpers import fresh_app, serve


async def order_ids(client: httpx.AsyncClient, user: TestUser) -> list[str]:
    page = (await client.get("/v1/orders", params={"limit": 100}, headers=user.headers)).json()
    return [item["id"] for item in page["items"]]


async def test_api6_business_flow_an_idempotency_key_cannot_be_replayed_with_another_body(
    client: httpx.AsyncClient, user: TestUser
) -> None:
    headers = {**user.headers, "Idempotency-Key": f"flow-{uuid.uuid4()}"}
    first = await client.post("/v1/orders", json=order_payload(), headers=headers)
    assert first.status_code == 201
    cheaper = order_payload(items=[{"sku": "SKU-1", "quantity": 100, "unit_price": 0}])
    replay = await client.post("/v1/orders", json=cheaper, headers=headers)
    assert_problem(replay, 422, "idempotency-key-reused")
    assert await order_ids(client, user) == [first.json()["id"]]
    stored = (await client.get(f"/v1/orders/{first.json()['id']}", headers=user.headers)).json()
    assert stored["total_amount"] == first.json()["total_amount"]


async def test_api6_business_flow_cancelling_twice_is_409_and_changes_nothing_more(
    client: httpx.AsyncClient,
    sessionmaker: async_sessionmaker[AsyncSession],
    user: TestUser,
) -> None:
    order = await make_order(client, user)
    path = f"/v1/orders/{order['id']}/cancel"
    assert (await client.post(path, headers=user.headers)).status_code == 200
    assert_problem(await client.post(path, headers=user.headers), 409, "invalid-transition")
    stored = await read_order(sessionmaker, uuid.UUID(order["id"]))
    assert (stored.status, stored.version) == ("cancelled", 2)
    assert await outbox_event_count(sessionmaker, stored.id) == 2  # created + one cancelled


async def test_api6_business_flow_an_order_cannot_be_moved_back_to_pending(
    client: httpx.AsyncClient,
    sessionmaker: async_sessionmaker[AsyncSession],
    user: TestUser,
    admin: TestUser,
) -> None:
    order = await make_order(client, user)
    path = f"/v1/orders/{order['id']}"
    assert_problem(
        await client.patch(path, json={"status": "pending"}, headers=admin.headers),
        409,
        "invalid-transition",
    )
    assert (
        await client.patch(path, json={"status": "paid"}, headers=admin.headers)
    ).status_code == 200
    for target in ("pending", "paid", "delivered"):
        response = await client.patch(path, json={"status": target}, headers=admin.headers)
        assert_problem(response, 409, "invalid-transition")
    stored = await read_order(sessionmaker, uuid.UUID(order["id"]))
    assert (stored.status, stored.version) == ("paid", 2)


async def test_api6_business_flow_placing_orders_beyond_the_quota_is_429(
    app_factory: Callable[..., FastAPI], user: TestUser
) -> None:
    async with serve(fresh_app(app_factory, RATE_LIMIT_ORDERS_CREATE="3/60")) as client:
        created = [
            (
                await client.post("/v1/orders", json=order_payload(), headers=user.headers)
            ).status_code
            for _ in range(3)
        ]
        assert created == [201, 201, 201]
        for _ in range(3):
            refused = await client.post("/v1/orders", json=order_payload(), headers=user.headers)
            assert_problem(refused, 429, "rate-limited")
            assert refused.headers["ratelimit-policy"] == '"orders_create";q=3;w=60'
        assert len(await order_ids(client, user)) == 3
