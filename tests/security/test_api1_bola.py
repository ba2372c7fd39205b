"""API1:2023 Broken Object Level Authorization: another user's order does not exist for you.

Reads are cached per viewer (SPEC §7), so each check also runs after the owner has
warmed the cache: a cache entry must never answer for another viewer.
"""

from __future__ import annotations

import uuid

import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.event_helpers import read_order
from tests.factories import TestUser, make_order
from tests.problems import assert_problem


async def warm(client: httpx.AsyncClient, owner: TestUser, path: str) -> httpx.Response:
    """The owner reads `path` twice; the second answer comes from the cache."""
    await client.get(path, headers=owner.headers)
    response = await client.get(path, headers=owner.headers)
    assert response.status_code == 200, response.text
    assert response.headers["x-cache"] == "HIT"
    return response


async def test_api1_bola_another_users_order_is_404_even_from_a_warm_cache(
    client: httpx.AsyncClient, user: TestUser, other_user: TestUser, admin: TestUser
) -> None:
    order = await make_order(client, user)
    path = f"/v1/orders/{order['id']}"
    etag = (await warm(client, user, path)).headers["etag"]

    stranger = await client.get(path, headers=other_user.headers)
    body = assert_problem(stranger, 404, "not-found")
    assert order["id"] not in body["detail"]
    assert stranger.headers.get("x-cache") != "HIT"
    assert "etag" not in stranger.headers

    # A 304 would confirm that the order exists and which version it is at.
    conditional = await client.get(path, headers={**other_user.headers, "If-None-Match": etag})
    assert_problem(conditional, 404, "not-found")
    missing = await client.get(f"/v1/orders/{uuid.uuid4()}", headers=other_user.headers)
    assert missing.json()["detail"] == stranger.json()["detail"]  # same answer: no existence leak

    as_admin = await client.get(path, headers=admin.headers)
    assert as_admin.status_code == 200
    assert as_admin.json()["id"] == order["id"]


async def test_api1_bola_another_user_cannot_cancel_an_order(
    client: httpx.AsyncClient,
    sessionmaker: async_sessionmaker[AsyncSession],
    user: TestUser,
    other_user: TestUser,
) -> None:
    order = await make_order(client, user)
    await warm(client, user, f"/v1/orders/{order['id']}")
    response = await client.post(f"/v1/orders/{order['id']}/cancel", headers=other_user.headers)
    assert_problem(response, 404, "not-found")
    stored = await read_order(sessionmaker, uuid.UUID(order["id"]))
    assert (stored.status, stored.version) == ("pending", 1)


async def test_api1_bola_lists_never_show_another_users_orders(
    client: httpx.AsyncClient, user: TestUser, other_user: TestUser, admin: TestUser
) -> None:
    mine = {(await make_order(client, user))["id"] for _ in range(3)}
    await warm(client, user, "/v1/orders")
    theirs = {(await make_order(client, other_user))["id"]}

    page = await client.get("/v1/orders", params={"limit": 100}, headers=other_user.headers)
    assert page.status_code == 200
    seen = {item["id"] for item in page.json()["items"]}
    assert seen == theirs
    assert {item["user_id"] for item in page.json()["items"]} == {str(other_user.id)}

    for status in ("pending", "cancelled"):
        filtered = await client.get(
            "/v1/orders", params={"status": status}, headers=other_user.headers
        )
        assert not {item["id"] for item in filtered.json()["items"]} & mine

    snooping = await client.get(
        "/v1/orders", params={"user_id": str(user.id)}, headers=other_user.headers
    )
    assert_problem(snooping, 403, "forbidden")

    as_admin = await client.get(
        "/v1/orders", params={"user_id": str(user.id), "limit": 100}, headers=admin.headers
    )
    assert {item["id"] for item in as_admin.json()["items"]} == mine
