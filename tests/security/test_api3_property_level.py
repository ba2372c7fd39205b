"""API3:2023 Broken Object Property Level Authorization.

Responses expose exactly the documented properties (never a hash or an internal
column), and requests cannot set a property the server owns (mass assignment).
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import httpx
import jwt
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.helpers.auth import REQUIRED_CLAIMS
from tests.event_helpers import read_order
from tests.factories import PASSWORD, TestUser, make_order, order_payload
from tests.problems import assert_problem
from tests.security.helpers import (
    ITEM_FIELDS,
    ORDER_FIELDS,
    USER_FIELDS,
    error_locs,
)

# Column names of users, refresh_tokens, idempotency_keys and outbox that no client sees.
INTERNAL_NAMES = {
    "password_hash",
    "password",
    "token_hash",
    "family_id",
    "used_at",
    "revoked_at",
    "expires_at",
    "request_hash",
    "response_body",
    "metadata_",
    "routing_key",
    "attempts",
    "last_error",
    "sent_at",
}


def keys_of(value: Any) -> set[str]:
    """Every object key anywhere in a JSON value."""
    if isinstance(value, dict):
        return set(value) | {key for item in value.values() for key in keys_of(item)}
    if isinstance(value, list):
        return {key for item in value for key in keys_of(item)}
    return set()


class Recorder:
    """Every response of one client session, for a scan after the fact."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.responses: list[httpx.Response] = []

    async def __call__(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = await self.client.request(method, path, **kwargs)
        self.responses.append(response)
        return response


async def full_session(call: Recorder, admin: TestUser) -> list[str]:
    """Register, log in both ways, read /me, refresh, order, read, list, cancel, log out.

    Returns every refresh token the session was given.
    """
    email = f"props-{uuid.uuid4().hex[:12]}@example.com"
    registered = await call(
        "POST", "/v1/auth/register", json={"email": email, "password": PASSWORD}
    )
    assert registered.status_code == 201
    await call("POST", "/v1/auth/login", json={"email": email, "password": "wrong password"})
    form = await call("POST", "/v1/auth/token", data={"username": email, "password": PASSWORD})
    pair = (
        await call("POST", "/v1/auth/login", json={"email": email, "password": PASSWORD})
    ).json()
    issued = [form.json()["refresh_token"], pair["refresh_token"]]
    headers = {"Authorization": f"Bearer {pair['access_token']}"}
    await call("GET", "/v1/auth/me", headers=headers)
    pair = (
        await call("POST", "/v1/auth/refresh", json={"refresh_token": pair["refresh_token"]})
    ).json()
    issued.append(pair["refresh_token"])
    headers = {"Authorization": f"Bearer {pair['access_token']}"}
    keyed = {**headers, "Idempotency-Key": uuid.uuid4().hex}
    order = (await call("POST", "/v1/orders", json=order_payload(), headers=keyed)).json()
    await call("POST", "/v1/orders", json=order_payload(), headers=keyed)  # replay
    second = (await call("POST", "/v1/orders", json=order_payload(), headers=headers)).json()
    await call("GET", f"/v1/orders/{order['id']}", headers=headers)
    await call("GET", f"/v1/orders/{order['id']}", headers=headers)  # from the cache
    await call("GET", "/v1/orders", params={"limit": 1}, headers=headers)
    await call("POST", f"/v1/orders/{order['id']}/cancel", headers=headers)
    await call(
        "PATCH", f"/v1/orders/{second['id']}", json={"status": "paid"}, headers=admin.headers
    )
    await call("GET", "/v1/orders", headers=admin.headers)
    await call("GET", "/v1/rate-limits", headers=headers)
    await call(
        "POST", "/v1/auth/logout", json={"refresh_token": pair["refresh_token"]}, headers=headers
    )
    return issued


async def test_api3_property_level_no_response_of_a_session_carries_a_secret_or_an_internal_column(
    client: httpx.AsyncClient, admin: TestUser
) -> None:
    call = Recorder(client)
    refresh_tokens = await full_session(call, admin)
    assert len(refresh_tokens) == 3
    # The database keeps only SHA-256 digests of refresh tokens; no answer ever shows one.
    digests = [hashlib.sha256(token.encode()).hexdigest() for token in refresh_tokens]
    assert len(call.responses) == 17
    for response in call.responses:
        assert response.status_code < 500, response.text
        text = response.text
        for secret in (PASSWORD, "$argon2", *digests):
            assert secret not in text, (response.request.url, secret)
        if text:
            assert not keys_of(response.json()) & INTERNAL_NAMES, response.request.url
        assert "set-cookie" not in response.headers


async def test_api3_property_level_responses_have_exactly_the_documented_properties(
    client: httpx.AsyncClient, user: TestUser
) -> None:
    me = (await client.get("/v1/auth/me", headers=user.headers)).json()
    assert set(me) == USER_FIELDS
    order = await make_order(client, user)
    assert set(order) == ORDER_FIELDS
    assert all(set(item) == ITEM_FIELDS for item in order["items"])
    page = (await client.get("/v1/orders", headers=user.headers)).json()
    assert set(page) == {"items", "next_cursor"}
    assert all(set(item) == ORDER_FIELDS for item in page["items"])

    email = f"claims-{uuid.uuid4().hex[:12]}@example.com"
    await client.post("/v1/auth/register", json={"email": email, "password": PASSWORD})
    pair = (await client.post("/v1/auth/login", json={"email": email, "password": PASSWORD})).json()
    assert set(pair) == {"access_token", "refresh_token", "token_type", "expires_in"}
    # The token is readable by anyone who holds it: it names the user and nothing more.
    claims = jwt.decode(pair["access_token"], options={"verify_signature": False})
    assert set(claims) == set(REQUIRED_CLAIMS)
    assert email not in str(claims)


async def test_api3_property_level_register_cannot_choose_a_role(
    client: httpx.AsyncClient,
) -> None:
    email = f"role-{uuid.uuid4().hex[:12]}@example.com"
    body = {"email": email, "password": PASSWORD, "role": "admin"}
    response = await client.post("/v1/auth/register", json=body)
    assert_problem(response, 422, "validation-error")
    assert ["body", "role"] in error_locs(response)
    # Nothing was created: the same email can register, as a plain user.
    plain = await client.post("/v1/auth/register", json={"email": email, "password": PASSWORD})
    assert plain.status_code == 201
    assert plain.json()["role"] == "user"


SERVER_OWNED_ORDER_FIELDS: dict[str, Any] = {
    "total_amount": 1,
    "status": "paid",
    "user_id": str(uuid.uuid4()),
    "id": str(uuid.uuid4()),
    "version": 7,
    "created_at": "2020-01-01T00:00:00Z",
    "colour": "red",
}


@pytest.mark.parametrize("field", SERVER_OWNED_ORDER_FIELDS)
async def test_api3_property_level_an_order_refuses_fields_the_server_owns(
    client: httpx.AsyncClient, user: TestUser, field: str
) -> None:
    body = order_payload(**{field: SERVER_OWNED_ORDER_FIELDS[field]})
    response = await client.post("/v1/orders", json=body, headers=user.headers)
    assert_problem(response, 422, "validation-error")
    assert ["body", field] in error_locs(response)
    page = (await client.get("/v1/orders", headers=user.headers)).json()
    assert page["items"] == []


async def test_api3_property_level_an_item_refuses_a_client_line_total(
    client: httpx.AsyncClient, user: TestUser
) -> None:
    items = [{"sku": "SKU-1", "quantity": 2, "unit_price": 100, "line_total": 1}]
    response = await client.post(
        "/v1/orders", json=order_payload(items=items), headers=user.headers
    )
    assert_problem(response, 422, "validation-error")
    assert ["body", "items", 0, "line_total"] in error_locs(response)


async def test_api3_property_level_admin_patch_sets_the_status_and_nothing_else(
    client: httpx.AsyncClient,
    sessionmaker: async_sessionmaker[AsyncSession],
    user: TestUser,
    admin: TestUser,
) -> None:
    order = await make_order(client, user)
    path = f"/v1/orders/{order['id']}"
    for extra in ({"version": 9}, {"total_amount": 0}, {"user_id": str(admin.id)}):
        response = await client.patch(path, json={"status": "paid", **extra}, headers=admin.headers)
        assert_problem(response, 422, "validation-error")
    stored = await read_order(sessionmaker, uuid.UUID(order["id"]))
    assert (stored.status, stored.version, stored.user_id) == ("pending", 1, user.id)
    assert stored.total_amount == order["total_amount"]
