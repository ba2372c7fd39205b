"""One pooled asyncio Redis client per process, with short timeouts."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from api.configs import Settings


def create_redis(settings: Settings) -> Redis:
    """A lazily connecting client; a down Redis fails a call fast instead of hanging it."""
    if settings.REDIS_USER:
        username: str | None = settings.REDIS_USER
        password = settings.REDIS_USER_PASSWORD.get_secret_value() or None
    else:
        username = None
        password = settings.REDIS_PASSWORD.get_secret_value() or None
    return Redis(
        host=settings.REDIS_HOST,
        port=settings.REDIS_PORT,
        db=settings.REDIS_DB,
        username=username,
        password=password,
        socket_timeout=settings.REDIS_SOCKET_TIMEOUT,
        socket_connect_timeout=settings.REDIS_SOCKET_TIMEOUT,
        health_check_interval=30,
        max_connections=64,
        # One immediate retry on a broken connection only: a pooled connection that died
        # with a Redis restart reconnects instead of failing a request. A timeout (a hung
        # Redis) is not retried, so no call waits longer than one socket timeout.
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        client_name="orders-api",
    )
