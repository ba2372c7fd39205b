"""Auth: register, login, the OAuth2 form, refresh rotation and reuse, logout, /me, tokens."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import jwt
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.configs import Settings
from api.helpers.auth import REQUIRED_CLAIMS
from tests.factories import PASSWORD, TestUser, make_order, order_payload
from tests.problems import assert_problem

USER_FIELDS = {"id", "email", "name", "role", "created_at"}


def fresh_email() -> str:
    return f"auth-{uuid.uuid4().hex[:12]}@example.com"


async def register(
    client: httpx.AsyncClient, email: str, password: str = PASSWORD, **extra: Any
) -> httpx.Response:
    return await client.post(
        "/v1/auth/register", json={"email": email, "password": password, **extra}
    )


async def login(client: httpx.AsyncClient, email: str, password: str = PASSWORD) -> httpx.Response:
    return await client.post("/v1/auth/login", json={"email": email, "password": password})


async def registered_pair(client: httpx.AsyncClient) -> tuple[str, dict[str, Any]]:
    """A new account and the token pair of its first login."""
    email = fresh_email()
    assert (await register(client, email)).status_code == 201
    response = await login(client, email)
    assert response.status_code == 200, response.text
    return email, response.json()


async def refresh(client: httpx.AsyncClient, refresh_token: str) -> httpx.Response:
    return await client.post("/v1/auth/refresh", json={"refresh_token": refresh_token})


async def me(client: httpx.AsyncClient, access_token: str) -> httpx.Response:
    return await client.get("/v1/auth/me", headers={"Authorization": f"Bearer {access_token}"})


def assert_unauthorized(response: httpx.Response) -> None:
    assert_problem(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"


async def fetch_one(sessionmaker: async_sessionmaker[AsyncSession], sql: str, **params: Any) -> Any:
    async with sessionmaker() as session:
        return (await session.execute(text(sql), params)).one()


async def family_rows(sessionmaker: async_sessionmaker[AsyncSession], email: str) -> list[Any]:
    async with sessionmaker() as session:
        result = await session.execute(
            text(
                "SELECT family_id, used_at, revoked_at FROM refresh_tokens "
                "JOIN users ON users.id = refresh_tokens.user_id WHERE users.email = :email "
                "ORDER BY refresh_tokens.created_at"
            ),
            {"email": email},
        )
        return list(result.all())


# --- register ---------------------------------------------------------------------------


async def test_register_returns_the_user_with_a_lower_cased_email(
    client: httpx.AsyncClient, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    local = f"Ada.Lovelace.{uuid.uuid4().hex[:8]}"
    response = await register(client, f"{local}@Example.COM", name="Ada")
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == USER_FIELDS
    assert body["email"] == f"{local.lower()}@example.com"
    assert body["name"] == "Ada"
    assert body["role"] == "user"
    uuid.UUID(body["id"])
    assert body["created_at"].endswith("Z")
    row = await fetch_one(
        sessionmaker, "SELECT password_hash FROM users WHERE id = :id", id=uuid.UUID(body["id"])
    )
    assert row.password_hash.startswith("$argon2id$v=19$m=19456,t=2,p=1$")


async def test_register_without_a_name_stores_none(client: httpx.AsyncClient) -> None:
    response = await register(client, fresh_email())
    assert response.status_code == 201
    assert response.json()["name"] is None


@pytest.mark.parametrize(("given", "stored"), [("  Ada Lovelace \n", "Ada Lovelace"), ("\n", None)])
async def test_register_trims_the_name_and_a_blank_one_is_no_name(
    client: httpx.AsyncClient, given: str, stored: str | None
) -> None:
    # Found by Schemathesis: "\n" matches the documented 1-200 characters, so it must
    # not be a 422.
    response = await register(client, fresh_email(), name=given)
    assert response.status_code == 201, response.text
    assert response.json()["name"] == stored


@pytest.mark.parametrize("length", [8, 1024])
async def test_register_accepts_passwords_at_the_length_bounds(
    client: httpx.AsyncClient, length: int
) -> None:
    email = fresh_email()
    password = "p" * length
    assert (await register(client, email, password)).status_code == 201
    assert (await login(client, email, password)).status_code == 200


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"email": "not-an-email", "password": PASSWORD}, "email"),
        ({"email": "x@example.com", "password": "seven77"}, "password"),
        ({"email": "x@example.com", "password": "p" * 1025}, "password"),
        ({"email": "x@example.com"}, "password"),
        ({"email": "x@example.com", "password": PASSWORD, "role": "admin"}, "role"),
        ({"email": "x@example.com", "password": PASSWORD, "name": ""}, "name"),
    ],
    ids=["bad-email", "short-password", "long-password", "no-password", "extra-field", "empty"],
)
async def test_register_rejects_invalid_bodies(
    client: httpx.AsyncClient, body: dict[str, Any], field: str
) -> None:
    response = await client.post("/v1/auth/register", json=body)
    problem = assert_problem(response, 422, "validation-error")
    assert [err["loc"][-1] for err in problem["errors"]] == [field]
    if "password" in body:
        assert body["password"] not in response.text


async def test_register_twice_is_a_conflict_whatever_the_case(client: httpx.AsyncClient) -> None:
    email = fresh_email()
    assert (await register(client, email)).status_code == 201
    response = await register(client, email.upper(), "another password")
    assert_problem(response, 409, "conflict")


async def test_ten_concurrent_registrations_of_one_email_yield_one_201_and_nine_409(
    client: httpx.AsyncClient, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    email = fresh_email()
    responses = await asyncio.gather(*(register(client, email, f"password-{n}") for n in range(10)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201] + [409] * 9
    row = await fetch_one(sessionmaker, "SELECT count(*) AS n FROM users WHERE email = :e", e=email)
    assert row.n == 1
    winner = next(n for n, r in enumerate(responses) if r.status_code == 201)
    assert (await login(client, email, f"password-{winner}")).status_code == 200


# --- login, /token, /me -------------------------------------------------------------------


async def test_login_returns_a_bearer_pair_whose_access_token_opens_me(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    email = fresh_email()
    registered = (await register(client, email, name="Grace")).json()
    response = await login(client, email.upper())
    assert response.status_code == 200, response.text
    pair = response.json()
    assert set(pair) == {"access_token", "refresh_token", "token_type", "expires_in"}
    assert pair["token_type"] == "bearer"
    assert pair["expires_in"] == settings.JWT_LIFETIME * 60
    claims = jwt.decode(pair["access_token"], options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == pair["expires_in"]
    assert claims["iss"] == claims["aud"] == "orders-api"
    assert claims["sub"] == registered["id"]
    mine = await me(client, pair["access_token"])
    assert mine.status_code == 200
    assert mine.json() == registered


async def test_login_rejects_unknown_fields(client: httpx.AsyncClient, user: TestUser) -> None:
    response = await client.post(
        "/v1/auth/login", json={"email": user.email, "password": PASSWORD, "remember": True}
    )
    assert response.status_code == 422


async def test_unknown_email_and_wrong_password_get_the_same_answer(
    client: httpx.AsyncClient, user: TestUser
) -> None:
    unknown = await login(client, fresh_email())
    wrong = await login(client, user.email, "wrong password, same length!")
    for response in (unknown, wrong):
        assert_unauthorized(response)

    def comparable(response: httpx.Response) -> dict[str, Any]:
        body: dict[str, Any] = response.json()
        body.pop("request_id")
        return body

    assert comparable(unknown) == comparable(wrong)
    assert unknown.content.replace(
        unknown.headers["x-request-id"].encode(), b""
    ) == wrong.content.replace(wrong.headers["x-request-id"].encode(), b"")
    drop = {"x-request-id", "date"}
    assert {k: v for k, v in unknown.headers.items() if k not in drop} == {
        k: v for k, v in wrong.headers.items() if k not in drop
    }


async def test_openapi_declares_the_password_flow_for_swaggers_authorize(
    client: httpx.AsyncClient,
) -> None:
    spec = (await client.get("/openapi.json")).json()
    schemes = spec["components"]["securitySchemes"]
    flows = [s["flows"] for s in schemes.values() if s["type"] == "oauth2"]
    assert flows == [{"password": {"scopes": {}, "tokenUrl": "/v1/auth/token"}}]
    (scheme_name,) = schemes
    assert spec["paths"]["/v1/auth/me"]["get"]["security"] == [{scheme_name: []}]
    token_body = spec["paths"]["/v1/auth/token"]["post"]["requestBody"]
    assert "application/x-www-form-urlencoded" in token_body["content"]
    docs = await client.get("/docs")
    assert docs.status_code == 200
    assert "/openapi.json" in docs.text


async def test_token_form_as_swagger_posts_it_returns_a_token_usable_on_me(
    client: httpx.AsyncClient, user: TestUser
) -> None:
    # What Swagger UI's Authorize dialog sends for the OAuth2 password flow.
    response = await client.post(
        "/v1/auth/token",
        data={"grant_type": "password", "username": user.email, "password": PASSWORD},
    )
    assert response.status_code == 200, response.text
    pair = response.json()
    assert pair["token_type"] == "bearer"
    mine = await me(client, pair["access_token"])
    assert mine.status_code == 200
    assert mine.json()["id"] == str(user.id)
    assert (await refresh(client, pair["refresh_token"])).status_code == 200


async def test_token_form_with_a_wrong_password_is_unauthorized(
    client: httpx.AsyncClient, user: TestUser
) -> None:
    response = await client.post(
        "/v1/auth/token", data={"username": user.email, "password": "not the password"}
    )
    assert_unauthorized(response)


async def test_me_without_a_token_is_unauthorized(client: httpx.AsyncClient) -> None:
    assert_unauthorized(await client.get("/v1/auth/me"))
    basic = await client.get("/v1/auth/me", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert_unauthorized(basic)


# --- access tokens that must be refused ---------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segment(value: dict[str, Any]) -> str:
    return _b64(json.dumps(value, separators=(",", ":")).encode())


def claims_for(user_id: uuid.UUID, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": str(user_id),
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "jti": uuid.uuid4().hex,
        "iss": "orders-api",
        "aud": "orders-api",
        "typ": "access",
    }
    claims.update(overrides)
    return claims


def hand_signed(
    header: dict[str, Any], claims: dict[str, Any], key: bytes, digest: str = "sha256"
) -> str:
    """A JWT HMAC-signed whatever its header says (PyJWT refuses to build these)."""
    signing_input = f"{_segment(header)}.{_segment(claims)}"
    signature = hmac.new(key, signing_input.encode(), digest).digest()
    return f"{signing_input}.{_b64(signature)}"


def unsigned(alg: str, claims: dict[str, Any]) -> str:
    return f"{_segment({'alg': alg, 'typ': 'JWT'})}.{_segment(claims)}."


PUBLIC_KEY_PEM = (
    "-----BEGIN PUBLIC KEY-----\n"
    "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEVs/o5+uQbTjL3chynL4wXgUg2R9q\n"
    "9UU8I5mEovUf86QZ7kOBIjJwqnzD1omageEHWwHdBO6B+dFabmdT9POxg==\n"
    "-----END PUBLIC KEY-----\n"
)


def _secret(settings: Settings) -> str:
    return settings.JWT_SECRET_KEY.get_secret_value()


def _swap_segment(token: str, index: int, segment: str) -> str:
    parts = token.split(".")
    parts[index] = segment
    return ".".join(parts)


def forged_token(case: str, secret: str, user_id: uuid.UUID) -> str:
    """The token a refusal case sends: a valid token changed in exactly one way."""
    now = int(time.time())
    valid = claims_for(user_id)
    match case:
        case "expired":
            claims = claims_for(user_id, iat=now - 3600, nbf=now - 3600, exp=now - 60)
            return jwt.encode(claims, secret, algorithm="HS256")
        case "not-yet-valid":
            return jwt.encode(claims_for(user_id, nbf=now + 600), secret, algorithm="HS256")
        case "wrong-signature":
            return jwt.encode(valid, "another secret of at least 32 bytes!", algorithm="HS256")
        case "tampered-claims":
            token = jwt.encode(valid, secret, algorithm="HS256")
            return _swap_segment(token, 1, _segment(claims_for(uuid.uuid4())))
        case "alg-none" | "alg-None" | "alg-NONE":
            return unsigned(case.removeprefix("alg-"), valid)
        case "alg-none-keeping-the-signature":
            token = jwt.encode(valid, secret, algorithm="HS256")
            return _swap_segment(token, 0, _segment({"alg": "none", "typ": "JWT"}))
        case "rs256-header-hmac-signed-with-the-secret":
            return hand_signed({"alg": "RS256", "typ": "JWT"}, valid, secret.encode())
        case "hs256-signed-with-a-public-key":
            return hand_signed({"alg": "HS256", "typ": "JWT"}, valid, PUBLIC_KEY_PEM.encode())
        case "another-hmac-algorithm":
            return hand_signed({"alg": "HS512", "typ": "JWT"}, valid, secret.encode(), "sha512")
        case "wrong-issuer":
            return jwt.encode(claims_for(user_id, iss="someone-else"), secret, algorithm="HS256")
        case "wrong-audience":
            return jwt.encode(claims_for(user_id, aud="another-api"), secret, algorithm="HS256")
        case "refresh-typ":
            return jwt.encode(claims_for(user_id, typ="refresh"), secret, algorithm="HS256")
        case "subject-not-a-uuid":
            return jwt.encode(claims_for(user_id, sub="admin"), secret, algorithm="HS256")
        case "not-a-jwt":
            return "not-a-jwt"
        case _ if case.startswith("missing-"):
            del valid[case.removeprefix("missing-")]
            return jwt.encode(valid, secret, algorithm="HS256")
    raise AssertionError(f"unknown case {case}")


REFUSED_CASES = [
    "expired",
    "not-yet-valid",
    "wrong-signature",
    "tampered-claims",
    "alg-none",
    "alg-None",
    "alg-NONE",
    "alg-none-keeping-the-signature",
    "rs256-header-hmac-signed-with-the-secret",
    "hs256-signed-with-a-public-key",
    "another-hmac-algorithm",
    "wrong-issuer",
    "wrong-audience",
    "refresh-typ",
    "subject-not-a-uuid",
    "not-a-jwt",
    *(f"missing-{claim}" for claim in REQUIRED_CLAIMS),
]


async def test_a_hand_built_token_with_valid_claims_is_accepted(
    client: httpx.AsyncClient, settings: Settings, user: TestUser
) -> None:
    """The control for the refusals below: the same builder, nothing wrong, works."""
    token = jwt.encode(claims_for(user.id), _secret(settings), algorithm="HS256")
    assert (await me(client, token)).status_code == 200
    by_hand = hand_signed(
        {"alg": "HS256", "typ": "JWT"}, claims_for(user.id), _secret(settings).encode()
    )
    assert (await me(client, by_hand)).status_code == 200


@pytest.mark.parametrize("case", REFUSED_CASES)
async def test_invalid_access_tokens_are_refused(
    client: httpx.AsyncClient, settings: Settings, user: TestUser, case: str
) -> None:
    token = forged_token(case, _secret(settings), user.id)
    assert_unauthorized(await me(client, token))


async def test_a_refresh_token_used_as_an_access_token_is_refused(
    client: httpx.AsyncClient,
) -> None:
    _, pair = await registered_pair(client)
    assert_unauthorized(await me(client, pair["refresh_token"]))


async def test_the_access_token_of_a_deleted_user_is_refused(
    client: httpx.AsyncClient, sessionmaker: async_sessionmaker[AsyncSession], user: TestUser
) -> None:
    assert (await me(client, user.token)).status_code == 200
    async with sessionmaker() as session, session.begin():
        await session.execute(text("DELETE FROM users WHERE id = :id"), {"id": user.id})
    assert_unauthorized(await me(client, user.token))


async def test_a_deleted_user_can_neither_read_nor_place_orders_with_a_valid_token(
    client: httpx.AsyncClient, sessionmaker: async_sessionmaker[AsyncSession], user: TestUser
) -> None:
    # These routes check the user inside their one SQL statement, not in a dependency.
    created = await make_order(client, user)
    async with sessionmaker() as session, session.begin():
        await session.execute(text("DELETE FROM users WHERE id = :id"), {"id": user.id})
    fresh_read = {**user.headers, "Cache-Control": "no-cache"}
    assert_unauthorized(await client.get(f"/v1/orders/{created['id']}", headers=fresh_read))
    assert_unauthorized(await client.post("/v1/orders", json=order_payload(), headers=user.headers))
    keyed = {**user.headers, "Idempotency-Key": f"gone-{uuid.uuid4()}"}
    assert_unauthorized(await client.post("/v1/orders", json=order_payload(), headers=keyed))
    left = await fetch_one(
        sessionmaker, "SELECT count(*) AS n FROM orders WHERE user_id = :id", id=user.id
    )
    assert left.n == 0


# --- refresh rotation and reuse -----------------------------------------------------------


async def test_refresh_rotates_the_pair_and_spends_the_old_token(
    client: httpx.AsyncClient, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    email, first = await registered_pair(client)
    response = await refresh(client, first["refresh_token"])
    assert response.status_code == 200, response.text
    second = response.json()
    assert set(second) == {"access_token", "refresh_token", "token_type", "expires_in"}
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    assert (await me(client, second["access_token"])).json()["email"] == email
    third = await refresh(client, second["refresh_token"])
    assert third.status_code == 200
    rows = await family_rows(sessionmaker, email)
    assert len(rows) == 3
    assert len({row.family_id for row in rows}) == 1
    assert [row.used_at is not None for row in rows] == [True, True, False]
    assert all(row.revoked_at is None for row in rows)


async def test_refresh_tokens_are_stored_only_as_sha256(
    client: httpx.AsyncClient, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    _, pair = await registered_pair(client)
    digest = hashlib.sha256(pair["refresh_token"].encode()).digest()
    row = await fetch_one(
        sessionmaker,
        "SELECT expires_at - created_at AS lifetime FROM refresh_tokens WHERE token_hash = :h",
        h=digest,
    )
    assert row.lifetime.days == 30


async def test_reusing_a_spent_refresh_token_revokes_the_whole_family(
    client: httpx.AsyncClient, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    email, first = await registered_pair(client)
    other_session = (await login(client, email)).json()
    second = (await refresh(client, first["refresh_token"])).json()

    assert_unauthorized(await refresh(client, first["refresh_token"]))
    # The newest token of the family stops working too: the thief and the victim are both out.
    assert_unauthorized(await refresh(client, second["refresh_token"]))
    rows = await family_rows(sessionmaker, email)
    revoked = [row for row in rows if row.revoked_at is not None]
    assert len(revoked) == 2
    assert len({row.family_id for row in revoked}) == 1
    # Another login's family is not touched.
    assert (await refresh(client, other_session["refresh_token"])).status_code == 200


async def test_two_racing_uses_of_one_refresh_token_count_as_reuse(
    client: httpx.AsyncClient,
) -> None:
    _, pair = await registered_pair(client)
    responses = await asyncio.gather(*(refresh(client, pair["refresh_token"]) for _ in range(2)))
    assert sorted(r.status_code for r in responses) == [200, 401]
    (winner,) = [r.json() for r in responses if r.status_code == 200]
    assert_unauthorized(await refresh(client, winner["refresh_token"]))


async def test_an_expired_refresh_token_is_refused(
    client: httpx.AsyncClient, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    _, pair = await registered_pair(client)
    digest = hashlib.sha256(pair["refresh_token"].encode()).digest()
    async with sessionmaker() as session, session.begin():
        await session.execute(
            text(
                "UPDATE refresh_tokens SET expires_at = now() - interval '1 second' "
                "WHERE token_hash = :h"
            ),
            {"h": digest},
        )
    assert_unauthorized(await refresh(client, pair["refresh_token"]))


@pytest.mark.parametrize("value", ["unknown-token", "x" * 1024])
async def test_an_unknown_refresh_token_is_refused(client: httpx.AsyncClient, value: str) -> None:
    assert_unauthorized(await refresh(client, value))


async def test_an_oversized_refresh_token_is_a_validation_error(client: httpx.AsyncClient) -> None:
    response = await refresh(client, "x" * 1025)
    assert response.status_code == 422


async def test_an_access_token_is_not_a_refresh_token(client: httpx.AsyncClient) -> None:
    _, pair = await registered_pair(client)
    assert_unauthorized(await refresh(client, pair["access_token"]))


# --- logout -------------------------------------------------------------------------------


async def logout(
    client: httpx.AsyncClient, access_token: str, refresh_token: str
) -> httpx.Response:
    return await client.post(
        "/v1/auth/logout",
        json={"refresh_token": refresh_token},
        headers={"Authorization": f"Bearer {access_token}"},
    )


async def test_logout_revokes_the_family(
    client: httpx.AsyncClient, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    email, first = await registered_pair(client)
    second = (await refresh(client, first["refresh_token"])).json()
    elsewhere = (await login(client, email)).json()

    response = await logout(client, second["access_token"], first["refresh_token"])
    assert response.status_code == 204
    assert response.content == b""
    assert_unauthorized(await refresh(client, second["refresh_token"]))
    # Logging out one device leaves the caller's other sessions alone.
    assert (await refresh(client, elsewhere["refresh_token"])).status_code == 200
    rows = await family_rows(sessionmaker, email)
    assert sum(row.revoked_at is not None for row in rows) == 2


async def test_logout_twice_is_still_204(client: httpx.AsyncClient) -> None:
    _, pair = await registered_pair(client)
    assert (await logout(client, pair["access_token"], pair["refresh_token"])).status_code == 204
    assert (await logout(client, pair["access_token"], pair["refresh_token"])).status_code == 204


async def test_logout_with_someone_elses_refresh_token_changes_nothing(
    client: httpx.AsyncClient,
) -> None:
    _, victim = await registered_pair(client)
    _, caller = await registered_pair(client)
    response = await logout(client, caller["access_token"], victim["refresh_token"])
    assert response.status_code == 204
    assert (await refresh(client, victim["refresh_token"])).status_code == 200
    assert (await refresh(client, caller["refresh_token"])).status_code == 200


async def test_logout_needs_an_access_token(client: httpx.AsyncClient) -> None:
    _, pair = await registered_pair(client)
    response = await client.post("/v1/auth/logout", json={"refresh_token": pair["refresh_token"]})
    assert_unauthorized(response)
    # The refresh token does not stand in for the access token either.
    assert_unauthorized(await logout(client, pair["refresh_token"], pair["refresh_token"]))
    assert (await refresh(client, pair["refresh_token"])).status_code == 200


# --- argon2 parameters ----------------------------------------------------------------------


async def stored_hash(sessionmaker: async_sessionmaker[AsyncSession], email: str) -> str:
    row = await fetch_one(sessionmaker, "SELECT password_hash FROM users WHERE email = :e", e=email)
    return str(row.password_hash)


async def test_login_rehashes_when_the_argon2_parameters_changed(
    client: httpx.AsyncClient,
    app_factory: Callable[..., FastAPI],
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    email = fresh_email()
    assert (await register(client, email)).status_code == 201
    original = await stored_hash(sessionmaker, email)
    assert "$m=19456,t=2,p=1$" in original

    cheaper = app_factory(ARGON2_TIME_COST=1, ARGON2_MEMORY_COST=8192, ARGON2_PARALLELISM=2)
    async with (
        LifespanManager(cheaper, startup_timeout=30, shutdown_timeout=30) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://testserver"
        ) as other,
    ):
        # A wrong password proves nothing and must not touch the hash.
        assert (await login(other, email, "wrong password")).status_code == 401
        assert await stored_hash(sessionmaker, email) == original

        assert (await login(other, email)).status_code == 200
        rehashed = await stored_hash(sessionmaker, email)
        assert rehashed.startswith("$argon2id$v=19$m=8192,t=1,p=2$")

        assert (await login(other, email)).status_code == 200
        assert await stored_hash(sessionmaker, email) == rehashed

    # Back on the default parameters: still valid, and upgraded again.
    assert (await login(client, email)).status_code == 200
    assert "$m=19456,t=2,p=1$" in await stored_hash(sessionmaker, email)


# --- nothing secret in the logs ------------------------------------------------------------


async def test_passwords_hashes_and_tokens_never_reach_the_logs(
    client: httpx.AsyncClient,
    sessionmaker: async_sessionmaker[AsyncSession],
    capsys: pytest.CaptureFixture[str],
) -> None:
    email = fresh_email()
    password = f"log-secret-{uuid.uuid4().hex}"
    wrong = f"wrong-secret-{uuid.uuid4().hex}"
    too_short = uuid.uuid4().hex[:7]
    capsys.readouterr()

    assert (await register(client, email, password)).status_code == 201
    assert (await register(client, email, password)).status_code == 409
    assert (await register(client, fresh_email(), too_short)).status_code == 422
    assert (await login(client, email, wrong)).status_code == 401
    assert (await login(client, fresh_email(), wrong)).status_code == 401
    first = (await login(client, email, password)).json()
    form = await client.post("/v1/auth/token", data={"username": email, "password": password})
    second = (await refresh(client, first["refresh_token"])).json()
    assert (await refresh(client, first["refresh_token"])).status_code == 401  # reuse
    assert (await me(client, second["access_token"])).status_code == 200
    third = form.json()
    assert (await logout(client, third["access_token"], third["refresh_token"])).status_code == 204
    password_hash = await stored_hash(sessionmaker, email)

    captured = capsys.readouterr()
    logs = captured.out + captured.err
    assert '"path":"/v1/auth/login"' in logs  # the capture works
    assert "refresh token reuse detected" in logs
    secrets = [
        password,
        wrong,
        too_short,
        password_hash,
        password_hash.rsplit("$", 1)[-1],
        first["access_token"],
        first["refresh_token"],
        second["access_token"],
        second["refresh_token"],
        third["access_token"],
        third["refresh_token"],
    ]
    leaked = [secret for secret in secrets if secret in logs]
    assert leaked == []
