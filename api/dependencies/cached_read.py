"""The cached read: rate limit and cache lookup for cacheable routes, in one Redis call.

A cacheable route calls `lookup()` first. On a hit it answers from the cached
bytes without touching PostgreSQL; on a miss it authenticates and reads as
usual, then `fill()`s the entry under the generations read *before* its query.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

from fastapi import Request

from api.dependencies.limits import enforce, ip_identity, user_identity
from api.errors import ProblemError, Unauthorized
from api.helpers.auth import Principal, decode_access_token
from api.redis_core.cache import CachedResponse, CacheKeys
from api.state import get_state

CacheStatus = Literal["HIT", "MISS", "BYPASS"]
POLICY = "default"
T = TypeVar("T")

# Misses being loaded in this process, by (entry key, generations): concurrent
# misses for one entry share one database read instead of stampeding.
_IN_FLIGHT: dict[tuple[str, bytes | None, bytes | None], asyncio.Future[Any]] = {}
SETTLE_SECONDS = 0.5


@dataclass(slots=True)
class CacheLookup:
    """What the cache said for this request, and how to fill it on a miss."""

    status: CacheStatus
    cached: CachedResponse | None = None
    keys: CacheKeys | None = None
    viewer_generation: bytes | None = None
    shared_generation: bytes | None = None

    def headers(self) -> dict[str, str]:
        return {"X-Cache": self.status, "Cache-Control": "private", "Vary": "Authorization"}


_BYPASS = CacheLookup(status="BYPASS")


def _wants_fresh(request: Request) -> bool:
    """`Cache-Control: no-cache` from the client: skip the cache (still rate limited)."""
    return "no-cache" in request.headers.get("cache-control", "").lower()


async def lookup(
    request: Request, token: str | None, resource: str, *, order_id: uuid.UUID | None = None
) -> CacheLookup:
    """Spend a DEFAULT-policy token and, for a valid bearer token, read the viewer's entry.

    `order_id` for one order's read (an admin's entry of it depends on that order's
    counter), None for a list (an admin's list depends on the admins' counter).
    """
    state = get_state(request)
    viewer_id: uuid.UUID | None = None
    auth_error: ProblemError | None = None
    if token:
        try:
            viewer_id = decode_access_token(state["settings"], token)
        except ProblemError as exc:
            auth_error = exc
    else:
        auth_error = Unauthorized("Missing bearer token.")
    # The viewer's identity is the hash tag of their bucket and their cache keys alike.
    identity = user_identity(viewer_id) if viewer_id is not None else ip_identity(request)
    request.scope["state"]["rate_limit_identity"] = identity

    cache = state["cache"]
    if not cache.trustworthy:
        await cache.flush_pending()
    keys = None
    if viewer_id is not None and not _wants_fresh(request) and cache.trustworthy:
        keys = cache.keys(viewer_id, resource, order_id=order_id)
    read_keys = keys.as_list() if keys is not None else []

    limiter = state["limiter"]
    values: list[bytes | None] | None = None
    if limiter.enabled:
        decision = await enforce(request, limiter, POLICY, identity, read_keys=read_keys)
        values = decision.values
    elif read_keys:
        values = await cache.fetch(read_keys)

    if auth_error is not None:
        raise auth_error
    if keys is None or values is None:
        return _BYPASS
    read = cache.read(values)
    if read.cached is not None:
        cache.count(hit=True)
        return CacheLookup(status="HIT", cached=read.cached, keys=keys)
    # An admin's entry, or a miss: the counter of the admin's view, in its own slot. On
    # a miss it is read before the query, so a fill never outlives a write it raced.
    key = read.pending[0] if read.pending is not None else keys.shared_generation
    shared = await cache.generation(key)
    if shared is False:
        return _BYPASS
    shared = cast(bytes | None, shared)
    if read.pending is not None and read.pending[1] == (shared or b"0"):
        cache.count(hit=True)
        return CacheLookup(status="HIT", cached=read.pending[2], keys=keys)
    cache.count(hit=False)
    return CacheLookup(
        status="MISS",
        keys=keys,
        viewer_generation=read.viewer_generation,
        shared_generation=shared,
    )


async def fill(
    request: Request, found: CacheLookup, viewer: Principal, etag: str, body: bytes
) -> None:
    """Store what a miss read, under the counters read before it."""
    if found.status != "MISS" or found.keys is None:
        return
    await get_state(request)["cache"].store(
        found.keys,
        admin=viewer.is_admin,
        viewer_generation=found.viewer_generation,
        shared_generation=found.shared_generation,
        response=CachedResponse(etag=etag, body=body),
    )


async def invalidate_after_write(
    request: Request, owner_id: uuid.UUID, order_id: uuid.UUID | None = None
) -> None:
    """Bump the counters a committed write to `owner_id`'s order made stale."""
    await get_state(request)["cache"].invalidate(owner_id, order_id)


async def load_once(found: CacheLookup, load: Callable[[], Awaitable[T]]) -> T:
    """Run `load` for a miss, or join the same miss already loading in this process.

    The generations are part of the key: a request that started after a write sees
    bumped generations and never joins a load that began before it.
    """
    if found.status != "MISS" or found.keys is None:
        return await load()
    key = (found.keys.entry, found.viewer_generation, found.shared_generation)
    pending = _IN_FLIGHT.get(key)
    if pending is not None:
        return cast(T, await asyncio.shield(pending))
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    _IN_FLIGHT[key] = future
    try:
        result = await load()
    except asyncio.CancelledError:
        future.cancel()
        _IN_FLIGHT.pop(key, None)
        raise
    except BaseException as exc:
        future.set_exception(exc)
        future.exception()  # marks it retrieved: there may be no follower
        raise
    else:
        future.set_result(result)
        return result
    finally:
        # Kept a moment longer: a request that missed just before the fill landed joins
        # this result instead of reading again. Same generations, so nothing changed.
        asyncio.get_running_loop().call_later(SETTLE_SECONDS, _IN_FLIGHT.pop, key, None)
