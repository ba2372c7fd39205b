"""Per-viewer response cache for order reads, invalidated by generation counters.

An entry is `<dependency>\\n<etag>\\n<body>`, where the dependency names the
generation counter the entry was filled under and its value, read *before* the
database query that produced the body:

- `v <gen>`: the viewer's own counter (`{user:<id>}:gen`, in the entry's slot). A
  non-admin's reads depend only on writes to their own orders.
- `k <gen> <key>`: another counter, for an admin's view: the order's counter
  (`{order:<id>}:gen`) for one order, the admins' counter (`{admins}:gen`) for a list.

Every committed write bumps the owner's, the order's and the admins' counters (one
single-key script call each, so one slot each), so an entry filled from a read that
raced the write carries the old value and is never served: no stale read after a
write through this service, without deleting keys one by one.

The viewer's counter and entry are read in the rate limiter's script (same slot), so
an owner's hit costs one Redis call; an admin's hit reads its counter in a second
call. Calls go through the process's circuit, shared with the limiter: while it is
open fills and invalidations are skipped at once (an owed invalidation keeps the cache
bypassed) instead of each waiting out a socket timeout.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from dataclasses import dataclass
from typing import cast

from api.configs import Settings
from api.metrics import cache_lookups
from api.redis_core.circuit import REDIS_ERRORS, RedisCircuit
from api.redis_core.keys import RedisKeys
from api.redis_core.lua_script import BUMP_GENERATION
from api.redis_core.pipelining import AutoPipeline

logger = logging.getLogger(__name__)

# Generations outlive every entry filled under them.
GENERATION_TTL_SECONDS = 86_400


@dataclass(frozen=True, slots=True)
class CachedResponse:
    etag: str
    body: bytes


@dataclass(frozen=True, slots=True)
class CacheKeys:
    """One viewer's entry for one resource, the viewer's counter (both in the viewer's
    slot) and the counter an admin's view of the resource depends on (another slot)."""

    entry: str
    viewer_generation: str
    shared_generation: str

    def as_list(self) -> list[str]:
        # What the limiter's script reads, in the order `read` expects.
        return [self.viewer_generation, self.entry]


@dataclass(frozen=True, slots=True)
class CacheRead:
    """An entry as read: current (`cached`), stale, or waiting on another counter."""

    cached: CachedResponse | None
    viewer_generation: bytes | None
    # (counter key, generation stored) of an admin's entry, to compare in a second call.
    pending: tuple[str, bytes, CachedResponse] | None = None


class ResponseCache:
    """Reads arrive through the limiter's script; the rest of the cache's calls come here."""

    def __init__(
        self,
        calls: AutoPipeline,
        settings: Settings,
        circuit: RedisCircuit,
        keys: RedisKeys | None = None,
    ) -> None:
        self._calls = calls
        self.circuit = circuit
        self.layout = keys or RedisKeys(settings.REDIS_KEY_PREFIX)
        self.ttl = settings.REDIS_TTL_EXPIRE
        self._bump_script = calls.register_script(BUMP_GENERATION)
        # Counters whose bump failed (Redis away); bumped before the next read.
        self._pending: set[str] = set()

    def keys(self, viewer_id: uuid.UUID, resource: str, *, order_id: uuid.UUID | None) -> CacheKeys:
        """Where `viewer_id`'s view of `resource` lives; `order_id` for one order's read."""
        shared = (
            self.layout.order_generation(order_id)
            if order_id is not None
            else self.layout.admins_generation()
        )
        return CacheKeys(
            entry=self.layout.entry(viewer_id, resource),
            viewer_generation=self.layout.viewer_generation(viewer_id),
            shared_generation=shared,
        )

    @property
    def trustworthy(self) -> bool:
        """False while an invalidation is owed: entries may then be stale, so bypass."""
        return not self._pending

    async def fetch(self, keys: list[str]) -> list[bytes | None] | None:
        """The values of `keys` (one slot) when the limiter does not read them; None on failure."""
        if not self.circuit.allow():
            return None
        try:
            values = await self._calls.execute("MGET", *keys)
        except REDIS_ERRORS as exc:
            self.circuit.report(exc, "cache read")
            return None
        return cast(list[bytes | None], values)

    async def generation(self, key: str) -> bytes | bool | None:
        """The counter at `key`; False when it cannot be read (then neither serve nor fill)."""
        if not self.circuit.allow():
            return False
        try:
            value = await self._calls.execute("GET", key)
        except REDIS_ERRORS as exc:
            self.circuit.report(exc, "cache read")
            return False
        return cast(bytes | None, value)

    @staticmethod
    def read(values: list[bytes | None]) -> CacheRead:
        """Judge the entry read with the viewer's counter (`CacheKeys.as_list()` order)."""
        viewer_generation, entry = values
        if entry is None:
            return CacheRead(None, viewer_generation)
        header, _, rest = entry.partition(b"\n")
        etag, _, body = rest.partition(b"\n")
        response = CachedResponse(etag=etag.decode(), body=body)
        kind, _, dependency = header.partition(b" ")
        if kind == b"v":
            current = dependency == (viewer_generation or b"0")
            return CacheRead(response if current else None, viewer_generation)
        generation, _, key = dependency.partition(b" ")
        return CacheRead(None, viewer_generation, pending=(key.decode(), generation, response))

    @staticmethod
    def count(hit: bool) -> None:
        cache_lookups("hit" if hit else "miss").inc()

    async def store(
        self,
        keys: CacheKeys,
        *,
        admin: bool,
        viewer_generation: bytes | None,
        shared_generation: bytes | None,
        response: CachedResponse,
    ) -> None:
        """Fill the entry under the counter of the viewer's scope read before the query."""
        if admin:
            header = b"k %s %s" % (shared_generation or b"0", keys.shared_generation.encode())
        else:
            header = b"v %s" % (viewer_generation or b"0")
        entry = b"".join((header, b"\n", response.etag.encode(), b"\n", response.body))
        if not self.circuit.allow():
            return
        try:
            await self._calls.execute("SET", keys.entry, entry, "EX", self.ttl)
        except REDIS_ERRORS as exc:
            self.circuit.report(exc, "cache fill")

    async def invalidate(self, owner_id: uuid.UUID, order_id: uuid.UUID | None = None) -> bool:
        """After a committed write to an order of `owner_id`: bump every counter it staled,
        and those an earlier failure still owes."""
        keys = {self.layout.viewer_generation(owner_id), self.layout.admins_generation()}
        if order_id is not None:
            keys.add(self.layout.order_generation(order_id))
        return await self._bump(keys | self._pending)

    async def flush_pending(self) -> bool:
        """Bump every owed counter; False (serve nothing from the cache) while that fails."""
        if not self._pending:
            return True
        return await self._bump(set(self._pending))

    async def _bump(self, keys: set[str]) -> bool:
        """Bump `keys`; those not bumped (Redis away, the caller cancelled) are owed.

        A bump in flight owes nothing: the write is committed but not yet answered, and
        a read racing an unanswered write may see it or not. Only a failed bump makes the
        cache untrustworthy, for every request of this process, until it is paid.
        """
        if not self.circuit.allow():
            self._pending |= keys
            return False
        start = secrets.randbelow(2**40) + 1
        ordered = list(keys)
        # Queued in one pass: one pipeline, each call on its own key's slot.
        calls = [
            self._calls.evalsha(self._bump_script, [key], [GENERATION_TTL_SECONDS, start])
            for key in ordered
        ]
        bumped: set[str] = set()
        try:
            for key, call in zip(ordered, calls, strict=True):
                try:
                    await call
                except REDIS_ERRORS as exc:
                    if self.circuit.report(exc, "cache invalidation"):
                        logger.warning(
                            "cache invalidation failed", extra={"error": type(exc).__name__}
                        )
                else:
                    bumped.add(key)
        finally:
            self._pending -= bumped
            self._pending |= keys - bumped
        if bumped == keys:
            self.circuit.succeeded()
            return True
        return False
