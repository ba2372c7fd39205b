"""The response cache's invalidation: which writes make this process bypass the cache."""

from __future__ import annotations

import asyncio
import uuid

from redis.asyncio import Redis

from api.redis_core.layer import open_redis_layer
from tests.conftest import run_settings


async def test_a_bump_in_flight_leaves_the_cache_trusted() -> None:
    """A read racing a write that is committed but not yet answered may see it or not:
    while another request's bump is on its way, this process still serves from the
    cache (it once bypassed it for every read during any write, which under a stream
    of writes meant never)."""
    layer = open_redis_layer(run_settings())
    try:
        bump = asyncio.create_task(layer.cache.invalidate(uuid.uuid4(), uuid.uuid4()))
        await asyncio.sleep(0)  # the bump is queued and awaited, not yet answered
        trusted_meanwhile = layer.cache.trustworthy
        bumped = await bump
    finally:
        await layer.close()
    assert trusted_meanwhile
    assert bumped
    assert layer.cache.trustworthy


async def test_a_failed_bump_is_owed_until_paid_and_the_cache_bypassed_meanwhile(
    redis: Redis,
) -> None:
    """A bump Redis refuses (here WRONGTYPE: a list under the counter's key) leaves the
    counter owed: the process bypasses its cache until a later bump of it succeeds."""
    settings = run_settings()
    owner = uuid.uuid4()
    layer = open_redis_layer(settings)
    counter = layer.cache.layout.viewer_generation(owner)
    await redis.rpush(counter, "not a counter")
    try:
        failed = await layer.cache.invalidate(owner)
        owed = not layer.cache.trustworthy
        other = await layer.cache.invalidate(uuid.uuid4())  # pays nothing: still refused
        still_owed = not layer.cache.trustworthy
        await redis.delete(counter)
        paid = await layer.cache.flush_pending()
        value = await redis.get(counter)
    finally:
        await redis.delete(counter)
        await layer.close()
    assert not failed
    assert owed
    assert not other
    assert still_owed
    assert paid
    assert layer.cache.trustworthy
    assert value is not None
