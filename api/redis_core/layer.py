"""The process's Redis side in one place: client, auto-pipeline, circuit, limiter, cache."""

from __future__ import annotations

from dataclasses import dataclass

from api.configs import Settings
from api.redis_core.cache import ResponseCache
from api.redis_core.circuit import RedisCircuit
from api.redis_core.client import RedisClient, close_redis, create_redis
from api.redis_core.keys import RedisKeys
from api.redis_core.pipelining import AutoPipeline
from api.redis_core.rate_limiter import RateLimiter


@dataclass(slots=True)
class RedisLayer:
    client: RedisClient
    calls: AutoPipeline
    circuit: RedisCircuit
    limiter: RateLimiter
    cache: ResponseCache

    async def close(self) -> None:
        """In reverse: the probe, the queued calls, then the client's connections."""
        await self.circuit.close()
        await self.calls.close()
        await close_redis(self.client)


def open_redis_layer(settings: Settings) -> RedisLayer:
    """Build it without connecting (the first call connects)."""
    client = create_redis(settings)
    # The limiter's and the cache's calls of one loop pass leave in one pipeline.
    calls = AutoPipeline(client, timeout=settings.REDIS_SOCKET_TIMEOUT)
    keys = RedisKeys(settings.REDIS_KEY_PREFIX)
    # One circuit for the limiter and the cache: a hung Redis is noticed once, by both,
    # and probed with the call every request makes.
    circuit = RedisCircuit(lambda: limiter.probe())
    limiter = RateLimiter(calls, settings, circuit, keys)
    cache = ResponseCache(calls, settings, circuit, keys)
    return RedisLayer(client, calls, circuit, limiter, cache)
