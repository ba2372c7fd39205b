"""Per-viewer response cache for order reads, invalidated by generation counters.

An entry is `<scope>:<generation>\\n<etag>\\n<body>`: the generation counter of the
scope it was filled under (`user` for an owner, `all` for an admin), read
*before* the database query that produced the body. Every committed write bumps
the owner's counter and the admin counter, so an entry filled from a read that
raced the write carries the old generation and is never served: no stale read
after a write through this service, without deleting keys one by one.

The counters and the entry are read in the rate limiter's round trip
(`RateLimiter.hit(read_keys=...)`), so a hit costs one Redis call in all. Fills
and invalidations go through the process's Redis circuit, shared with the limiter:
while it is open they are skipped at once (an owed invalidation keeps the cache
bypassed) instead of each waiting out a socket timeout.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from dataclasses import dataclass
from typing import cast

from redis.asyncio import Redis

from api.configs import Settings
from api.metrics import cache_lookups
from api.redis_core.circuit import REDIS_UNAVAILABLE, RedisCircuit
from api.redis_core.lua_script import BUMP_GENERATIONS
from api.redis_core.multiplexed import MultiplexedRedis

logger = logging.getLogger(__name__)

# Generations outlive every entry filled under them.
GENERATION_TTL_SECONDS = 86_400


@dataclass(frozen=True, slots=True)
class CachedResponse:
    etag: str
    body: bytes


@dataclass(frozen=True, slots=True)
class CacheKeys:
    """One viewer's entry for one resource, and the two counters it may depend on."""

    entry: str
    user_generation: str
    all_generation: str

    def as_list(self) -> list[str]:
        # The order `read` expects its values in.
        return [self.user_generation, self.all_generation, self.entry]


class ResponseCache:
    """Reads arrive through the limiter's script; fills and invalidations come here."""

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        circuit: RedisCircuit | None = None,
        *,
        scripts: MultiplexedRedis | None = None,
    ) -> None:
        self._redis = redis
        self.circuit = circuit or RedisCircuit(redis)
        self._prefix = settings.REDIS_KEY_PREFIX
        self.ttl = settings.REDIS_TTL_EXPIRE
        # Run after every write: on the pipelined connection when there is one.
        self._bump = (scripts or redis).register_script(BUMP_GENERATIONS)
        self._pipelined = scripts
        # Owners whose invalidation failed (Redis away); bumped before the next read.
        self._pending: set[uuid.UUID] = set()

    def _generation_key(self, owner_id: uuid.UUID | None) -> str:
        if owner_id is None:
            return f"{self._prefix}cache:gen:all"
        return f"{self._prefix}cache:gen:user:{owner_id}"

    def keys(self, viewer_id: uuid.UUID, resource: str) -> CacheKeys:
        """Where `viewer_id`'s view of `resource` (e.g. `order:<id>`) lives."""
        return CacheKeys(
            entry=f"{self._prefix}cache:{viewer_id}:{resource}",
            user_generation=self._generation_key(viewer_id),
            all_generation=self._generation_key(None),
        )

    @property
    def trustworthy(self) -> bool:
        """False while an invalidation is owed: entries may then be stale, so bypass."""
        return not self._pending

    async def fetch(self, keys: list[str]) -> list[bytes | None] | None:
        """The values of `keys` (`CacheKeys.as_list()`) when the limiter does not read them;
        None while Redis is away."""
        if not self.circuit.allow():
            return None
        try:
            if self._pipelined is not None:
                values = await self._pipelined.execute("MGET", *keys)
            else:
                values = await self._redis.mget(keys)
        except REDIS_UNAVAILABLE:
            self.circuit.failed()
            return None
        return cast(list[bytes | None], values)

    @staticmethod
    def read(
        values: list[bytes | None],
    ) -> tuple[CachedResponse | None, bytes | None, bytes | None]:
        """(the entry if filled under its scope's current generation, user gen, all gen)."""
        user_generation, all_generation, entry = values
        cached = None
        if entry is not None:
            header, _, rest = entry.partition(b"\n")
            scope, _, generation = header.partition(b":")
            current = all_generation if scope == b"all" else user_generation
            if generation == (current or b"0"):
                etag, _, body = rest.partition(b"\n")
                cached = CachedResponse(etag=etag.decode(), body=body)
        cache_lookups("hit" if cached is not None else "miss").inc()
        return cached, user_generation, all_generation

    async def store(
        self,
        keys: CacheKeys,
        *,
        admin: bool,
        generation: bytes | None,
        response: CachedResponse,
    ) -> None:
        """Fill the entry under the generation read before the query; failures only log."""
        scope = b"all" if admin else b"user"
        entry = b"".join(
            (scope, b":", generation or b"0", b"\n", response.etag.encode(), b"\n", response.body)
        )
        if not self.circuit.allow():
            return
        try:
            await self._redis.set(keys.entry, entry, ex=self.ttl)
        except REDIS_UNAVAILABLE as exc:
            self.circuit.failed()
            logger.warning("cache fill failed", extra={"error": type(exc).__name__})

    async def invalidate(self, owner_id: uuid.UUID) -> bool:
        """After a committed write to an order of `owner_id`: bump their and the admin counter."""
        self._pending.add(owner_id)
        return await self.flush_pending()

    async def flush_pending(self) -> bool:
        """Bump every owed generation; False (serve nothing from the cache) while that fails."""
        if not self._pending:
            return True
        if not self.circuit.allow():
            return False
        owners = list(self._pending)
        keys = [self._generation_key(owner) for owner in owners] + [self._generation_key(None)]
        try:
            await self._bump(keys=keys, args=[GENERATION_TTL_SECONDS, secrets.randbelow(2**40) + 1])
        except REDIS_UNAVAILABLE as exc:
            self.circuit.failed()
            logger.warning("cache invalidation failed", extra={"error": type(exc).__name__})
            return False
        self.circuit.succeeded()
        self._pending.difference_update(owners)
        return True
