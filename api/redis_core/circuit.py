"""One circuit breaker per process for every Redis caller: the limiter and the cache.

After a failure (an error, or no answer within REDIS_SOCKET_TIMEOUT) every caller
skips Redis at once (memory buckets, cache BYPASS) instead of each waiting out its
own timeout. A background task pings Redis once per pause and closes the circuit
when it answers, so no request ever waits on a probe: a hung Redis costs only the
requests already waiting on it when it hung.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from redis.asyncio import Redis
from redis.exceptions import RedisError

# After a failure, skip Redis this long before each probe.
REDIS_RETRY_PAUSE = 1.0

# What a Redis call raises when Redis is away. RuntimeError too: under uvloop, a write
# to a connection the peer has reset fails with "unable to perform operation on
# <TCPTransport closed=True>", which redis-py passes through as it is.
REDIS_UNAVAILABLE: tuple[type[BaseException], ...] = (RedisError, OSError, RuntimeError)


class RedisCircuit:
    """Closed: use Redis. Open: skip it until a background ping answers."""

    def __init__(self, redis: Redis, *, pause: float = REDIS_RETRY_PAUSE) -> None:
        self._redis = redis
        self._pause = pause
        self._opened_at: float | None = None
        self._probe: asyncio.Task[None] | None = None

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    def allow(self) -> bool:
        """Whether a caller may use Redis now."""
        return self._opened_at is None

    def succeeded(self) -> None:
        """Redis answered a caller: close the circuit."""
        self._opened_at = None

    def failed(self) -> bool:
        """Redis failed a caller: open the circuit; True when this failure opened it."""
        opened = self._opened_at is None
        if opened:
            self._opened_at = time.monotonic()
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._probe_until_closed(), name="redis-probe")
        return opened

    async def _probe_until_closed(self) -> None:
        while self._opened_at is not None:
            await asyncio.sleep(self._pause)
            try:
                await self._redis.ping()
            except REDIS_UNAVAILABLE:
                continue
            self.succeeded()

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
            self._probe = None
