"""API2:2023 Broken Authentication: every non-public operation refuses bad credentials.

The operations come from the app's own OpenAPI document, so a route added later is
covered without touching this file.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from api.configs import Settings
from tests.factories import PASSWORD, TestUser, order_payload
from tests.problems import assert_problem
from tests.security.helpers import expired_token, forged_token, fresh_app, serve

PUBLIC_V1 = frozenset(
    {
        ("POST", "/v1/auth/register"),
        ("POST", "/v1/auth/login"),
        ("POST", "/v1/auth/token"),
        ("POST", "/v1/auth/refresh"),
        ("GET", "/v1/rate-limits"),
    }
)
# logout, me, orders (create, list, read, cancel, admin PATCH), redirect (five methods).
PROTECTED_OPERATIONS = 12
# A well-formed body for each operation that takes one, so only the credentials are wrong.
BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/v1/orders"): order_payload(),
    ("PATCH", "/v1/orders/{order_id}"): {"status": "paid"},
    ("POST", "/v1/auth/logout"): {"refresh_token": "not-a-real-token"},
}


def protected_operations(document: dict[str, Any]) -> list[tuple[str, str]]:
    """(method, path template) of every operation that declares security or is a private /v1."""
    found = []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            key = (method.upper(), path)
            if operation.get("security") or (path.startswith("/v1/") and key not in PUBLIC_V1):
                found.append(key)
    return sorted(found)


def concrete(path: str) -> str:
    """The template with its parameters filled in."""
    return re.sub(r"\{path(:path)?\}", "some/where", path.replace("{order_id}", str(uuid.uuid4())))


def credentials(settings: Settings, victim: TestUser) -> dict[str, dict[str, str]]:
    """Authorization headers that must all be refused, by what is wrong with them."""
    bearer = "Bearer {}".format
    return {
        "none": {},
        "empty bearer": {"Authorization": "Bearer "},
        "garbled": {"Authorization": bearer("not.a.jwt")},
        "basic scheme": {"Authorization": "Basic dXNlcjpwYXNz"},
        "expired": {"Authorization": bearer(expired_token(settings, victim.id))},
        "wrong key": {"Authorization": bearer(forged_token(victim.id, key="k" * 64))},
        "alg none": {"Authorization": bearer(forged_token(victim.id, key=None, algorithm="none"))},
    }


async def test_api2_broken_authentication_every_protected_operation_refuses_bad_tokens(
    client: httpx.AsyncClient, settings: Settings, user: TestUser
) -> None:
    document = (await client.get("/openapi.json")).json()
    operations = protected_operations(document)
    assert ("GET", "/v1/orders") in operations
    assert ("DELETE", "/v1/redirect/{service}/{path}") in operations
    assert len(operations) == PROTECTED_OPERATIONS, operations

    refused = 0
    for method, path in operations:
        for reason, headers in credentials(settings, user).items():
            response = await client.request(
                method, concrete(path), headers=headers, json=BODIES.get((method, path))
            )
            assert response.status_code == 401, (method, path, reason, response.text)
            assert_problem(response, 401, "unauthorized")
            assert response.headers["www-authenticate"] == "Bearer", (method, path, reason)
            refused += 1
    assert refused == PROTECTED_OPERATIONS * len(credentials(settings, user))


async def test_api2_broken_authentication_every_protected_operation_is_documented_as_such(
    client: httpx.AsyncClient,
) -> None:
    document = (await client.get("/openapi.json")).json()
    for method, path in protected_operations(document):
        operation = document["paths"][path][method.lower()]
        assert operation["security"] == [{"OAuth2PasswordBearer": []}], (method, path)
        assert "401" in operation["responses"], (method, path)


async def test_api2_broken_authentication_login_brute_force_is_429_after_the_auth_quota_per_ip(
    app_factory: Callable[..., FastAPI], user: TestUser
) -> None:
    async with serve(fresh_app(app_factory, RATE_LIMIT_AUTH="3/60")) as client:
        wrong = {"email": user.email, "password": "not the password"}
        for _ in range(3):
            assert_problem(await client.post("/v1/auth/login", json=wrong), 401, "unauthorized")

        # The right password does not help once the bucket is empty: guessing stops here.
        right = {"email": user.email, "password": PASSWORD}
        refused = await client.post("/v1/auth/login", json=right)
        assert_problem(refused, 429, "rate-limited")
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.headers["ratelimit-policy"] == '"auth";q=3;w=60'

        # Neither another endpoint of the policy nor a forged client address resets it.
        form = {"username": user.email, "password": PASSWORD}
        assert_problem(await client.post("/v1/auth/token", data=form), 429, "rate-limited")
        spoofed = await client.post(
            "/v1/auth/login", json=right, headers={"X-Forwarded-For": "203.0.113.9"}
        )
        assert_problem(spoofed, 429, "rate-limited")
        # A token of a valid user does not lift a per-IP policy either.
        with_token = await client.post("/v1/auth/login", json=right, headers=user.headers)
        assert_problem(with_token, 429, "rate-limited")


@pytest.mark.parametrize("password", ["", "x" * 1025])
async def test_api2_broken_authentication_login_bounds_the_password_it_will_hash(
    client: httpx.AsyncClient, user: TestUser, password: str
) -> None:
    response = await client.post("/v1/auth/login", json={"email": user.email, "password": password})
    assert_problem(response, 422, "validation-error")
