"""The process's Redis side in one place: client, auto-pipeline, circuit, limiter, cache."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from api.configs import Settings
from api.redis_core.cache import ResponseCache
from api.redis_core.circuit import REDIS_ERRORS, RedisCircuit
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
    _warm_up: asyncio.Task[None] | None = field(default=None, repr=False)

    def start(self) -> None:
        """Connect and load the scripts in the background: the first requests then pay no
        connection set-up, slot map or NOSCRIPT round trips. Nothing waits for it; a
        Redis that is away now is met (and reported) by the requests as usual."""
        self._warm_up = asyncio.create_task(self._connect(), name="redis-warm-up")

    async def _connect(self) -> None:
        with contextlib.suppress(*REDIS_ERRORS):
            await self.limiter.probe()

    async def close(self) -> None:
        """In reverse: the warm-up, the probe, the queued calls, the client's connections."""
        if self._warm_up is not None:
            self._warm_up.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._warm_up
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
