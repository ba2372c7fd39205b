"""Seed the service through its own HTTP API: users, their tokens, and orders."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from dataclasses import dataclass

import httpx
import orjson

from bench.environment import SetupError

# The body every POST of the bench sends, to the service and to the reference INSERT alike.
ORDER_BODY: dict[str, object] = {
    "currency": "EUR",
    "items": [
        {"sku": "SKU-1001", "name": "Espresso beans 1 kg", "quantity": 2, "unit_price": 1899},
        {"sku": "SKU-2002", "name": "Milk jug", "quantity": 1, "unit_price": 1250},
        {"sku": "SKU-3003", "quantity": 3, "unit_price": 399},
    ],
    "metadata": {"channel": "bench", "campaign": "autumn"},
}
ORDER_BODY_BYTES = orjson.dumps(ORDER_BODY)
SEED_CONCURRENCY = 32


@dataclass(frozen=True, slots=True)
class SeededUser:
    email: str
    user_id: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def _expect(response: httpx.Response, status: int, what: str) -> None:
    if response.status_code != status:
        raise SetupError(
            f"seeding: {what} answered {response.status_code}, expected {status}: "
            f"{response.text[:300]}"
        )


async def register_and_login(client: httpx.AsyncClient, label: str, suffix: str) -> SeededUser:
    """A new account through POST /v1/auth/register, and a token through /v1/auth/login."""
    email = f"{label}-{suffix}@example.com"
    password = secrets.token_urlsafe(18)
    registered = await client.post(
        "/v1/auth/register", json={"email": email, "password": password, "name": label}
    )
    _expect(registered, 201, "POST /v1/auth/register")
    login = await client.post("/v1/auth/login", json={"email": email, "password": password})
    _expect(login, 200, "POST /v1/auth/login")
    return SeededUser(
        email=email, user_id=registered.json()["id"], token=login.json()["access_token"]
    )


async def create_orders(client: httpx.AsyncClient, user: SeededUser, count: int) -> list[str]:
    """`count` orders of `user` through POST /v1/orders; their ids."""
    semaphore = asyncio.Semaphore(SEED_CONCURRENCY)

    async def one() -> str:
        async with semaphore:
            response = await client.post(
                "/v1/orders",
                content=ORDER_BODY_BYTES,
                headers={
                    **user.headers,
                    "Content-Type": "application/json",
                    "Idempotency-Key": f"seed-{uuid.uuid4().hex}",
                },
            )
        _expect(response, 201, "POST /v1/orders")
        return str(response.json()["id"])

    return list(await asyncio.gather(*(one() for _ in range(count))))


def service_client(base_url: str) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=SEED_CONCURRENCY)
    return httpx.AsyncClient(base_url=base_url, timeout=30.0, limits=limits)
