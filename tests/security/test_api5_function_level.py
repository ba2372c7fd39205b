"""API5:2023 Broken Function Level Authorization: admin functions need the admin role, now."""

from __future__ import annotations

import uuid

import httpx
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.models import User
from tests.event_helpers import read_order
from tests.factories import TestUser, make_order
from tests.problems import assert_problem


async def test_api5_function_level_a_user_gets_403_on_the_admin_patch_for_any_id(
    client: httpx.AsyncClient,
    sessionmaker: async_sessionmaker[AsyncSession],
    user: TestUser,
    other_user: TestUser,
) -> None:
    own = await make_order(client, user)
    theirs = await make_order(client, other_user)
    for order_id in (own["id"], theirs["id"], str(uuid.uuid4())):
        for status in ("paid", "shipped", "cancelled"):
            response = await client.patch(
                f"/v1/orders/{order_id}", json={"status": status}, headers=user.headers
            )
            # 403 whether or not the order exists or is the caller's: nothing to probe.
            assert_problem(response, 403, "forbidden")
    for order in (own, theirs):
        stored = await read_order(sessionmaker, uuid.UUID(order["id"]))
        assert (stored.status, stored.version) == ("pending", 1)


async def test_api5_function_level_only_admins_list_another_users_orders(
    client: httpx.AsyncClient, user: TestUser, other_user: TestUser, admin: TestUser
) -> None:
    await make_order(client, other_user)
    refused = await client.get(
        "/v1/orders", params={"user_id": str(other_user.id)}, headers=user.headers
    )
    assert_problem(refused, 403, "forbidden")
    own = await client.get("/v1/orders", params={"user_id": str(user.id)}, headers=user.headers)
    assert own.status_code == 200
    allowed = await client.get(
        "/v1/orders", params={"user_id": str(other_user.id)}, headers=admin.headers
    )
    assert allowed.status_code == 200
    assert {item["user_id"] for item in allowed.json()["items"]} == {str(other_user.id)}


async def test_api5_function_level_the_role_is_read_from_the_database_not_the_token(
    client: httpx.AsyncClient,
    sessionmaker: async_sessionmaker[AsyncSession],
    user: TestUser,
    admin: TestUser,
) -> None:
    order = await make_order(client, user)
    path = f"/v1/orders/{order['id']}"
    async with sessionmaker() as session, session.begin():
        await session.execute(update(User).where(User.id == admin.id).values(role="user"))
    # The same, still valid token: demoted a moment ago, refused now.
    assert_problem(
        await client.patch(path, json={"status": "paid"}, headers=admin.headers), 403, "forbidden"
    )

    async with sessionmaker() as session, session.begin():
        await session.execute(update(User).where(User.id == user.id).values(role="admin"))
    promoted = await client.patch(path, json={"status": "paid"}, headers=user.headers)
    assert promoted.status_code == 200, promoted.text
    assert promoted.json()["status"] == "paid"
