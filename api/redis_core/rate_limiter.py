"""Token-bucket rate limiting in Redis, with per-process buckets while Redis is away.

Plain values in, a `Decision` out: the HTTP side (who the caller is, headers, 429)
is `api/dependencies/limits.py`. The decision is one EVALSHA of
`lua_script.TOKEN_BUCKET` on the bucket's slot, sent through the process's
auto-pipeline (NOSCRIPT reloads the script). During an outage the limiter serves
from an LRU of in-memory buckets of the same policy (each quota divided by
RATE_LIMIT_FALLBACK_DIVISOR), logs the outage once, counts it, and goes back to
Redis once the process's circuit (`circuit.py`, shared with the cache) closes. A
fault that is not an outage (WRONGTYPE under the key, NOPERM…) serves the request
from memory too, but is reported by the circuit as the error it is.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from api.configs import RateLimitPolicy, Settings
from api.metrics import RATE_LIMIT_FALLBACKS, rate_limit_decisions
from api.redis_core.circuit import REDIS_ERRORS, RedisCircuit
from api.redis_core.keys import READINESS_IDENTITY, RedisKeys
from api.redis_core.lua_script import TOKEN_BUCKET
from api.redis_core.pipelining import AutoPipeline

logger = logging.getLogger(__name__)

MAX_MEMORY_BUCKETS = 10_000


@dataclass(frozen=True, slots=True)
class Decision:
    policy: RateLimitPolicy
    allowed: bool
    remaining: int
    reset: int
    retry_after: int
    backend: str
    # Values of `read_keys`, read in the same round trip (None: not read, Redis away).
    values: list[bytes | None] | None = None

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The IETF RateLimit fields for this decision."""
        name = self.policy.name
        policy = f'"{name}";q={self.policy.quota};w={self.policy.window}'
        current = f'"{name}";r={self.remaining};t={self.reset}'
        headers = [(b"ratelimit-policy", policy.encode()), (b"ratelimit", current.encode())]
        if not self.allowed:
            headers.append((b"retry-after", str(max(1, self.retry_after)).encode()))
        return headers


class MemoryBuckets:
    """The same token bucket, per process, bounded by an LRU."""

    def __init__(self, max_buckets: int = MAX_MEMORY_BUCKETS, *, divisor: int = 1) -> None:
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._max = max_buckets
        self._divisor = divisor

    def take(self, key: str, policy: RateLimitPolicy, cost: int) -> Decision:
        """Spend from this process's bucket: `quota // divisor` (at least 1) per window."""
        now = time.monotonic()
        capacity = max(1, policy.quota // self._divisor)
        rate = capacity / policy.window
        tokens, stamp = self._buckets.get(key, (float(capacity), now))
        tokens = min(capacity, tokens + max(0.0, now - stamp) * rate)
        allowed = tokens >= cost
        if allowed:
            tokens -= cost
        if cost > 0 and allowed:
            self._buckets[key] = (tokens, now)
            self._buckets.move_to_end(key)
            while len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
        return Decision(
            policy=policy,
            allowed=allowed,
            remaining=math.floor(tokens),
            reset=math.ceil((capacity - tokens) / rate),
            retry_after=0 if allowed else math.ceil((cost - tokens) / rate),
            backend="memory",
        )


class RateLimiter:
    """Decides requests against the policies of `settings`."""

    def __init__(
        self,
        calls: AutoPipeline,
        settings: Settings,
        circuit: RedisCircuit,
        keys: RedisKeys | None = None,
    ) -> None:
        self.policies = settings.rate_limit_policies
        self.enabled = settings.RATE_LIMIT_ENABLED
        self.keys = keys or RedisKeys(settings.REDIS_KEY_PREFIX)
        self._calls = calls
        self._script = calls.register_script(TOKEN_BUCKET)
        self._memory = MemoryBuckets(divisor=settings.RATE_LIMIT_FALLBACK_DIVISOR)
        self.circuit = circuit
        self._in_outage = False

    def bucket_key(self, policy: RateLimitPolicy, identity: str) -> str:
        return self.keys.bucket(policy.name, identity)

    async def hit(
        self,
        policy_name: str,
        identity: str,
        *,
        cost: int = 1,
        read_keys: Sequence[str] = (),
    ) -> Decision:
        """Spend `cost` tokens (0 only looks); when allowed, also read `read_keys`.

        `read_keys` must carry the identity's hash tag (`RedisKeys`): one slot per call.
        """
        policy = self.policies[policy_name]
        key = self.bucket_key(policy, identity)
        decision: Decision | None = None
        if self.circuit.allow():
            decision = await self._redis_decision(policy, key, cost, read_keys)
        if decision is None:
            if not self.circuit.allow():
                self._note_outage()
            decision = self._memory.take(key, policy, cost)
        elif self._in_outage:
            self._in_outage = False
            logger.info("redis reachable again: rate limiting back on redis")
        if cost:
            rate_limit_decisions(
                policy.name, "allow" if decision.allowed else "deny", decision.backend
            ).inc()
        return decision

    async def _redis_decision(
        self,
        policy: RateLimitPolicy,
        key: str,
        cost: int,
        read_keys: Sequence[str],
    ) -> Decision | None:
        try:
            result: list[Any] = await self._calls.evalsha(
                self._script, [key, *read_keys], [policy.quota, policy.window, cost]
            )
        except REDIS_ERRORS as exc:
            if self.circuit.report(exc, "rate limit"):
                self._note_outage(type(exc).__name__)
            return None
        self.circuit.succeeded()
        allowed, remaining, reset, retry_after, values = result
        return Decision(
            policy=policy,
            allowed=bool(allowed),
            remaining=int(remaining),
            reset=int(reset),
            retry_after=int(retry_after),
            backend="redis",
            values=list(values) if read_keys else None,
        )

    async def probe(self) -> None:
        """What every request does, on a real slot: the script at cost 0 (raises on failure)."""
        key = self.keys.bucket("probe", READINESS_IDENTITY)
        await self._calls.evalsha(self._script, [key], [1, 1, 0])

    def _note_outage(self, error: str = "circuit open") -> None:
        """Log and count the fall-back once per outage, whoever noticed Redis was away."""
        if self._in_outage:
            return
        self._in_outage = True
        RATE_LIMIT_FALLBACKS.inc()
        logger.warning(
            "redis unreachable: rate limiting falls back to per-process buckets",
            extra={"error": error},
        )
