"""The typed state the lifespan opens and every request can reach as `request.state`."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network
from typing import TypedDict, cast

from fastapi import Request
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from api.configs import Settings
from api.rabbit_core.client import RabbitClient
from api.rabbit_core.rpc import RpcClient
from api.redis_core.cache import ResponseCache
from api.redis_core.client import RedisClient
from api.redis_core.rate_limiter import RateLimiter


class AppState(TypedDict):
    settings: Settings
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    redis: RedisClient
    rabbit: RabbitClient
    rpc: RpcClient
    limiter: RateLimiter
    cache: ResponseCache
    trusted_proxies: list[IPv4Network | IPv6Network]


def get_state(request: Request) -> AppState:
    """The lifespan state, which the server copies into every request's scope."""
    return cast(AppState, request.scope["state"])
