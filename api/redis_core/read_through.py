"""Rate limit and cache lookup for cacheable reads, in one Redis round trip.

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

from api.errors import ProblemError, Unauthorized
from api.helpers.auth import Principal, decode_access_token
from api.redis_core.cache import CachedResponse, CacheKeys
from api.redis_core.rate_limiter import client_ip, enforce
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
    user_generation: bytes | None = None
    all_generation: bytes | None = None

    def headers(self) -> dict[str, str]:
        return {"X-Cache": self.status, "Cache-Control": "private", "Vary": "Authorization"}


def _wants_fresh(request: Request) -> bool:
    """`Cache-Control: no-cache` from the client: skip the cache (still rate limited)."""
    return "no-cache" in request.headers.get("cache-control", "").lower()


async def lookup(request: Request, token: str | None, resource: str) -> CacheLookup:
    """Spend a DEFAULT-policy token and, for a valid bearer token, read the viewer's entry."""
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
    identity = (
        f"user:{viewer_id}"
        if viewer_id is not None
        else f"ip:{client_ip(request, state['trusted_proxies'])}"
    )
    request.scope["state"]["rate_limit_identity"] = identity

    cache = state["cache"]
    if not cache.trustworthy:
        await cache.flush_pending()
    keys = None
    if viewer_id is not None and not _wants_fresh(request) and cache.trustworthy:
        keys = cache.keys(viewer_id, resource)
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
        return CacheLookup(status="BYPASS")
    cached, user_generation, all_generation = cache.read(values)
    return CacheLookup(
        status="HIT" if cached is not None else "MISS",
        cached=cached,
        keys=keys,
        user_generation=user_generation,
        all_generation=all_generation,
    )


async def fill(
    request: Request, found: CacheLookup, viewer: Principal, etag: str, body: bytes
) -> None:
    """Store what a miss read, under the generation of the viewer's scope read before it."""
    if found.status != "MISS" or found.keys is None:
        return
    generation = found.all_generation if viewer.is_admin else found.user_generation
    await get_state(request)["cache"].store(
        found.keys,
        admin=viewer.is_admin,
        generation=generation,
        response=CachedResponse(etag=etag, body=body),
    )


async def invalidate_after_write(request: Request, owner_id: uuid.UUID) -> None:
    """Bump the generations a committed write to `owner_id`'s order made stale."""
    await get_state(request)["cache"].invalidate(owner_id)


async def load_once(found: CacheLookup, load: Callable[[], Awaitable[T]]) -> T:
    """Run `load` for a miss, or join the same miss already loading in this process.

    The generations are part of the key: a request that started after a write sees
    bumped generations and never joins a load that began before it.
    """
    if found.status != "MISS" or found.keys is None:
        return await load()
    key = (found.keys.entry, found.user_generation, found.all_generation)
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
