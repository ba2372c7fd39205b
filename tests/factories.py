"""Plain async factories for test data."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.configs import Settings
from api.helpers.auth import create_access_token
from api.models import User

PASSWORD = "correct horse battery staple"


@dataclass(frozen=True)
class TestUser:
    __test__ = False  # not a test class, despite the name

    id: uuid.UUID
    email: str
    role: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


async def make_user(
    sessionmaker: async_sessionmaker[AsyncSession],
    settings: Settings,
    *,
    role: str = "user",
    email: str | None = None,
) -> TestUser:
    """Insert a user directly and mint an access token for it."""
    email = email or f"user-{uuid.uuid4().hex[:12]}@example.com"
    async with sessionmaker() as session, session.begin():
        user_id = (
            await session.execute(
                insert(User)
                .values(email=email, password_hash=_password_hash(), name="Test User", role=role)
                .returning(User.id)
            )
        ).scalar_one()
    token, _ = create_access_token(settings, user_id=user_id)
    return TestUser(id=user_id, email=email, role=role, token=token)


_HASH: str | None = None


def _password_hash() -> str:
    global _HASH
    if _HASH is None:
        from argon2 import PasswordHasher

        _HASH = PasswordHasher(time_cost=2, memory_cost=19_456, parallelism=1).hash(PASSWORD)
    return _HASH


def order_payload(**overrides: object) -> dict[str, object]:
    """A valid `POST /v1/orders` body; keyword arguments replace its fields."""
    body: dict[str, object] = {
        "currency": "EUR",
        "items": [
            {"sku": "SKU-1", "name": "Widget", "quantity": 2, "unit_price": 1250},
            {"sku": "SKU-2", "quantity": 1, "unit_price": 499},
        ],
        "metadata": {"channel": "web"},
    }
    body.update(overrides)
    return body


async def make_order(
    client: httpx.AsyncClient, user: TestUser, **overrides: object
) -> dict[str, Any]:
    """Place an order through the API as `user` and return its body."""
    response = await client.post(
        "/v1/orders", json=order_payload(**overrides), headers=user.headers
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def insert_orders(
    sessionmaker: async_sessionmaker[AsyncSession],
    user_id: uuid.UUID,
    count: int,
    *,
    status: str = "pending",
) -> list[uuid.UUID]:
    """Insert `count` orders in one transaction (so they share `created_at`); their ids."""
    from api.models import Order

    ids = [uuid.uuid4() for _ in range(count)]
    item = {"sku": "SKU-1", "name": None, "quantity": 1, "line_total": 100, "unit_price": 100}
    async with sessionmaker() as session, session.begin():
        await session.execute(
            insert(Order),
            [
                {
                    "id": order_id,
                    "user_id": user_id,
                    "status": status,
                    "currency": "EUR",
                    "items": [item],
                    "total_amount": 100,
                }
                for order_id in ids
            ],
        )
    return ids


async def order_events(
    sessionmaker: async_sessionmaker[AsyncSession], order_id: uuid.UUID | str
) -> list[tuple[str, dict[str, Any]]]:
    """The outbox rows written for one order, oldest first: (routing key, envelope)."""
    import orjson
    from sqlalchemy import text

    async with sessionmaker() as session:
        rows = await session.execute(
            text(
                "SELECT routing_key, body FROM outbox"
                " WHERE convert_from(body, 'UTF8')::jsonb ->> 'subject' = :order_id ORDER BY id"
            ),
            {"order_id": str(order_id)},
        )
        return [(row.routing_key, orjson.loads(row.body)) for row in rows]
