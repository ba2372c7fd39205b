"""The per-process token buckets the limiter uses while Redis is away (SPEC §6)."""

from __future__ import annotations

import logging
import math

import pytest
from prometheus_client import REGISTRY

from api.configs import RateLimitPolicy, Settings
from api.redis_core import rate_limiter
from api.redis_core.circuit import RedisCircuit
from api.redis_core.client import close_redis, create_redis
from api.redis_core.pipelining import AutoPipeline
from api.redis_core.rate_limiter import Decision, MemoryBuckets, RateLimiter

THREE_PER_MINUTE = RateLimitPolicy(name="default", quota=3, window=60)


class Clock:
    """`time.monotonic` for the module under test, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(rate_limiter, "time", clock)
    return clock


def spend(buckets: MemoryBuckets, times: int, key: str = "k") -> list[Decision]:
    return [buckets.take(key, THREE_PER_MINUTE, 1) for _ in range(times)]


def test_the_quota_then_a_refusal_with_the_seconds_until_a_token(clock: Clock) -> None:
    decisions = spend(MemoryBuckets(), 4)
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    assert [d.reset for d in decisions] == [20, 40, 60, 60]  # seconds until full again
    assert decisions[-1].retry_after == 20  # one token every 60 / 3 s
    assert {d.backend for d in decisions} == {"memory"}


def test_tokens_come_back_at_the_policy_rate_and_never_above_the_quota(clock: Clock) -> None:
    buckets = MemoryBuckets()
    spend(buckets, 3)
    clock.now += 19.9
    assert not buckets.take("k", THREE_PER_MINUTE, 1).allowed
    clock.now += 0.1
    assert buckets.take("k", THREE_PER_MINUTE, 1).allowed
    clock.now += 3600  # idle for an hour: full, not sixty tokens
    assert [d.allowed for d in spend(buckets, 4)] == [True, True, True, False]


def test_looking_costs_nothing(clock: Clock) -> None:
    buckets = MemoryBuckets()
    for _ in range(10):
        peek = buckets.take("k", THREE_PER_MINUTE, 0)
        assert peek.allowed
        assert peek.remaining == 3
    assert [d.allowed for d in spend(buckets, 4)] == [True, True, True, False]


def test_a_cost_above_the_tokens_left_is_refused_and_spends_nothing(clock: Clock) -> None:
    buckets = MemoryBuckets()
    spend(buckets, 2)
    refused = buckets.take("k", THREE_PER_MINUTE, 2)
    assert not refused.allowed
    assert refused.retry_after == 20  # one more token is missing
    assert buckets.take("k", THREE_PER_MINUTE, 1).allowed


def test_each_identity_has_its_own_bucket(clock: Clock) -> None:
    buckets = MemoryBuckets()
    spend(buckets, 3, key="a")
    assert buckets.take("b", THREE_PER_MINUTE, 1).allowed
    assert not buckets.take("a", THREE_PER_MINUTE, 1).allowed


def test_the_fallback_divisor_shares_the_quota_between_processes() -> None:
    policy = RateLimitPolicy(name="default", quota=30, window=60)
    alone, shared = MemoryBuckets(), MemoryBuckets(divisor=6)
    admitted_alone = sum(alone.take("k", policy, 1).allowed for _ in range(40))
    admitted_shared = sum(shared.take("k", policy, 1).allowed for _ in range(40))
    # Six processes each admitting 30 // 6 during an outage: 30 for the fleet, not 180.
    assert (admitted_alone, admitted_shared) == (30, 5)


def test_a_divisor_above_the_quota_still_admits_one(clock: Clock) -> None:
    buckets = MemoryBuckets(divisor=100)
    assert [d.allowed for d in spend(buckets, 2)] == [True, False]


def test_the_least_recently_used_bucket_is_dropped_beyond_the_bound(clock: Clock) -> None:
    buckets = MemoryBuckets(max_buckets=2)
    spend(buckets, 1, key="a")
    spend(buckets, 1, key="b")
    spend(buckets, 1, key="a")  # "a" used again: "b" is now the oldest
    spend(buckets, 1, key="c")  # a third bucket: "b" goes
    assert buckets.take("a", THREE_PER_MINUTE, 1).remaining == 0  # kept: its third token
    assert buckets.take("b", THREE_PER_MINUTE, 1).remaining == 2  # dropped: a fresh bucket


def test_the_headers_are_the_ietf_ratelimit_fields(clock: Clock) -> None:
    allowed, _, _, refused = spend(MemoryBuckets(), 4)
    assert allowed.headers() == [
        (b"ratelimit-policy", b'"default";q=3;w=60'),
        (b"ratelimit", b'"default";r=2;t=20'),
    ]
    assert dict(refused.headers())[b"retry-after"] == b"20"


def test_retry_after_is_at_least_one_second() -> None:
    refused = Decision(THREE_PER_MINUTE, False, 0, 1, 0, "memory")
    assert dict(refused.headers())[b"retry-after"] == b"1"


def _fallbacks() -> float:
    return REGISTRY.get_sample_value("rate_limit_fallback_total") or 0.0


async def test_with_the_circuit_open_the_limiter_decides_from_memory_and_says_so_once(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    # A port nothing listens on: the limiter must not even try it while the circuit is open.
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, REDIS_PORT=1, RATE_LIMIT_DEFAULT="3/60", RATE_LIMIT_FALLBACK_DIVISOR=1
    )
    client = create_redis(settings)
    calls = AutoPipeline(client, timeout=0.5)

    async def probe() -> None:
        raise ConnectionError

    circuit = RedisCircuit(probe, pause=3600)
    limiter = RateLimiter(calls, settings, circuit)
    before = _fallbacks()
    try:
        circuit.failed()  # Redis is away
        caplog.set_level(logging.INFO, logger=rate_limiter.__name__)
        decisions = [await limiter.hit("default", "user:a") for _ in range(4)]
        other = await limiter.hit("default", "user:b")
    finally:
        await circuit.close()
        await calls.close()
        await close_redis(client)
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert {d.backend for d in [*decisions, other]} == {"memory"}
    assert other.allowed
    assert math.isclose(_fallbacks() - before, 1)  # one outage, counted once
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "redis unreachable: rate limiting falls back to per-process buckets"
    ]
