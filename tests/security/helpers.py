"""Shared by the OWASP tests: apps of their own, credentials (problems: `tests/problems.py`)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from api.configs import Settings
from api.helpers.auth import create_access_token
from tests.conftest import run_settings

ORDER_FIELDS = {
    "id",
    "user_id",
    "status",
    "currency",
    "items",
    "total_amount",
    "metadata",
    "version",
    "created_at",
    "updated_at",
}
ITEM_FIELDS = {"sku", "name", "quantity", "unit_price", "line_total"}
USER_FIELDS = {"id", "email", "name", "role", "created_at"}


def fresh_app(app_factory: Callable[..., FastAPI], **overrides: Any) -> FastAPI:
    """An app on this run's resources whose rate-limit buckets start full (own key prefix)."""
    prefix = f"{run_settings().REDIS_KEY_PREFIX}sec-{uuid.uuid4().hex[:8]}:"
    return app_factory(REDIS_KEY_PREFIX=prefix, **overrides)


@contextlib.asynccontextmanager
async def serve(app: FastAPI, *, rabbit: bool = False) -> AsyncIterator[httpx.AsyncClient]:
    """The app started (optionally until RabbitMQ is attached) behind an httpx client."""
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager:
        if rabbit:
            await manager._state["rabbit"].wait_connected(timeout=30)
            await manager._state["rpc"].wait_ready(timeout=30)
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield client


def error_locs(response: httpx.Response) -> list[list[Any]]:
    return [error["loc"] for error in response.json().get("errors", [])]


def expired_token(settings: Settings, user_id: uuid.UUID) -> str:
    """A correctly signed access token whose lifetime ended an hour ago."""
    token, _ = create_access_token(
        settings, user_id=user_id, now=datetime.now(UTC) - timedelta(hours=1)
    )
    return token


def forged_token(user_id: uuid.UUID, *, key: str | None, algorithm: str = "HS256") -> str:
    """Valid-looking claims signed with a key (or algorithm) the service does not use."""
    now = datetime.now(UTC)
    claims = {
        "sub": str(user_id),
        "iat": now,
        "nbf": now,
        "exp": now + timedelta(minutes=5),
        "jti": uuid.uuid4().hex,
        "iss": "orders-api",
        "aud": "orders-api",
        "typ": "access",
    }
    return jwt.encode(claims, key, algorithm=algorithm)
