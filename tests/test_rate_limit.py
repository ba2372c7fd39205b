"""The token bucket against real Redis: quota, refill, shared state, NOSCRIPT, outage."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from redis.asyncio import Redis

from api.configs import Settings
from api.redis_core.layer import RedisLayer, open_redis_layer
from api.redis_core.rate_limiter import RateLimiter
from tests.conftest import run_settings
from tests.services import redis_stopped


def _limiter(**overrides: str) -> tuple[RateLimiter, RedisLayer]:
    settings: Settings = run_settings(**overrides)
    layer = open_redis_layer(settings)
    return layer.limiter, layer


async def test_quota_then_refusal_with_retry_after() -> None:
    limiter, redis = _limiter(RATE_LIMIT_DEFAULT="5/60")
    identity = f"user:{uuid.uuid4()}"
    try:
        decisions = [await limiter.hit("default", identity) for _ in range(6)]
    finally:
        await redis.close()
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert [d.remaining for d in decisions[:5]] == [4, 3, 2, 1, 0]
    refused = decisions[5]
    assert refused.retry_after == 12  # one token every 60/5 s
    assert refused.reset == 60
    headers = dict(refused.headers())
    assert headers[b"ratelimit-policy"] == b'"default";q=5;w=60'
    assert headers[b"ratelimit"] == b'"default";r=0;t=60'
    assert headers[b"retry-after"] == b"12"


async def test_bucket_refills_over_time() -> None:
    limiter, redis = _limiter(RATE_LIMIT_DEFAULT="2/1")
    identity = f"user:{uuid.uuid4()}"
    try:
        assert (await limiter.hit("default", identity)).allowed
        assert (await limiter.hit("default", identity)).allowed
        assert not (await limiter.hit("default", identity)).allowed
        await asyncio.sleep(0.6)  # 2 tokens per second: one is back after 0.5 s
        assert (await limiter.hit("default", identity)).allowed
    finally:
        await redis.close()


async def test_looking_costs_no_token() -> None:
    limiter, redis = _limiter(RATE_LIMIT_DEFAULT="3/60")
    identity = f"user:{uuid.uuid4()}"
    try:
        for _ in range(10):
            peek = await limiter.hit("default", identity, cost=0)
            assert peek.remaining == 3
        assert (await limiter.hit("default", identity)).remaining == 2
    finally:
        await redis.close()


async def test_limit_is_shared_between_processes() -> None:
    first, redis_a = _limiter(RATE_LIMIT_DEFAULT="10/60")
    second, redis_b = _limiter(RATE_LIMIT_DEFAULT="10/60")
    identity = f"user:{uuid.uuid4()}"
    try:
        results = await asyncio.gather(
            *(limiter.hit("default", identity) for limiter in [first, second] * 10)
        )
    finally:
        await redis_a.close()
        await redis_b.close()
    assert sum(d.allowed for d in results) == 10
    assert all(d.backend == "redis" for d in results)


async def test_bucket_key_expires_once_full_again(redis: Redis) -> None:
    limiter, client = _limiter(RATE_LIMIT_DEFAULT="4/2")
    identity = f"user:{uuid.uuid4()}"
    try:
        await limiter.hit("default", identity)
        key = limiter.bucket_key(limiter.policies["default"], identity)
        ttl_ms = await redis.pttl(key)
        assert 0 < ttl_ms <= 500  # one token of 4/2 s refills in 500 ms
        assert key.startswith(run_settings().REDIS_KEY_PREFIX)
    finally:
        await client.close()


async def test_script_is_reloaded_after_script_flush(redis: Redis) -> None:
    limiter, client = _limiter(RATE_LIMIT_DEFAULT="5/60")
    identity = f"user:{uuid.uuid4()}"
    try:
        assert (await limiter.hit("default", identity)).backend == "redis"
        await redis.script_flush()
        decision = await limiter.hit("default", identity)
        assert decision.backend == "redis"
        assert decision.remaining == 3
    finally:
        await client.close()


@pytest.mark.faults
async def test_redis_down_falls_back_to_memory_buckets_then_recovers() -> None:
    limiter, client = _limiter(RATE_LIMIT_DEFAULT="3/60")
    identity = f"user:{uuid.uuid4()}"
    try:
        async with redis_stopped():
            down = [await limiter.hit("default", identity) for _ in range(4)]
            assert [d.backend for d in down] == ["memory"] * 4
            assert [d.allowed for d in down] == [True, True, True, False]
        await asyncio.sleep(1.1)  # the limiter retries Redis after its pause
        back = await limiter.hit("default", identity)
        assert back.backend == "redis"
    finally:
        await client.close()
