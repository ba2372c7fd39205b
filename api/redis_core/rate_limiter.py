"""Token-bucket rate limiting in Redis, with per-process buckets while Redis is away.

Each route is under exactly one policy (SPEC §6). The decision is one EVALSHA of
`lua_script.TOKEN_BUCKET` (redis-py reloads the script on NOSCRIPT). When Redis
cannot be reached the limiter keeps serving from an LRU of in-memory buckets of
the same policy, logs the outage once, counts it, and goes back to Redis once the
process's Redis circuit (`circuit.py`, shared with the cache) closes again.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import Any

from fastapi import Depends, Request
from redis.asyncio import Redis

from api.configs import RateLimitPolicy, Settings
from api.errors import ProblemError, RateLimited
from api.helpers.auth import bearer_token, decode_access_token
from api.metrics import RATE_LIMIT_FALLBACKS, rate_limit_decisions
from api.redis_core.circuit import REDIS_UNAVAILABLE, RedisCircuit
from api.redis_core.lua_script import TOKEN_BUCKET
from api.redis_core.multiplexed import MultiplexedRedis
from api.state import get_state

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

    def __init__(self, max_buckets: int = MAX_MEMORY_BUCKETS) -> None:
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._max = max_buckets

    def take(self, key: str, policy: RateLimitPolicy, cost: int) -> Decision:
        now = time.monotonic()
        rate = policy.quota / policy.window
        tokens, stamp = self._buckets.get(key, (float(policy.quota), now))
        tokens = min(policy.quota, tokens + max(0.0, now - stamp) * rate)
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
            reset=math.ceil((policy.quota - tokens) / rate),
            retry_after=0 if allowed else math.ceil((cost - tokens) / rate),
            backend="memory",
        )


class RateLimiter:
    """Decides requests against the policies of `settings`."""

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        circuit: RedisCircuit | None = None,
        *,
        scripts: MultiplexedRedis | None = None,
    ) -> None:
        self.policies = settings.rate_limit_policies
        self.enabled = settings.RATE_LIMIT_ENABLED
        self._prefix = settings.REDIS_KEY_PREFIX
        # The script runs on every request: on the pipelined connection when there is one.
        self._script = (scripts or redis).register_script(TOKEN_BUCKET)
        self._memory = MemoryBuckets()
        self.circuit = circuit or RedisCircuit(redis)
        self._in_outage = False

    def bucket_key(self, policy: RateLimitPolicy, identity: str) -> str:
        return f"{self._prefix}rl:{policy.name}:{identity}"

    async def hit(
        self,
        policy_name: str,
        identity: str,
        *,
        cost: int = 1,
        read_keys: Sequence[str] = (),
    ) -> Decision:
        """Spend `cost` tokens (0 only looks); when allowed, also read `read_keys`."""
        policy = self.policies[policy_name]
        key = self.bucket_key(policy, identity)
        decision: Decision | None = None
        if self.circuit.allow():
            decision = await self._redis_decision(policy, key, cost, read_keys)
        if decision is None:
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
            result: list[Any] = await self._script(
                keys=[key, *read_keys], args=[policy.quota, policy.window, cost]
            )
        except REDIS_UNAVAILABLE as exc:
            self.circuit.failed()
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

    @property
    def redis_available(self) -> bool:
        """False while the process's Redis circuit is open."""
        return self.circuit.allow()


def client_ip(request: Request, trusted_proxies: Sequence[IPv4Network | IPv6Network]) -> str:
    """The caller's address; `X-Forwarded-For` counts only when the peer is a trusted proxy.

    Walks the forwarded chain from the right, skipping trusted hops, so a client
    cannot choose its identity by sending its own `X-Forwarded-For`.
    """
    peer = request.client.host if request.client else "unknown"
    if not trusted_proxies or not _is_trusted(peer, trusted_proxies):
        return peer
    forwarded = request.headers.get("x-forwarded-for", "")
    hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _is_trusted(hop, trusted_proxies):
            return hop
    return hops[0] if hops else peer


def _is_trusted(address: str, networks: Sequence[IPv4Network | IPv6Network]) -> bool:
    try:
        ip = ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def request_identity(request: Request, *, by_ip: bool = False) -> str:
    """`user:<id>` for a valid bearer token, else (or when `by_ip`) `ip:<address>`."""
    state = request.scope["state"]
    app_state = get_state(request)
    if by_ip:
        return f"ip:{client_ip(request, app_state['trusted_proxies'])}"
    cached: str | None = state.get("rate_limit_identity")
    if cached is not None:
        return cached
    identity: str | None = None
    token = bearer_token(request)
    if token:
        try:
            identity = f"user:{decode_access_token(app_state['settings'], token)}"
        except ProblemError:
            identity = None
    if identity is None:
        identity = f"ip:{client_ip(request, app_state['trusted_proxies'])}"
    state["rate_limit_identity"] = identity
    return identity


def add_response_headers(request: Request, headers: list[tuple[bytes, bytes]]) -> None:
    """Headers the outer middleware adds to whatever response this request gets."""
    request.scope["state"].setdefault("response_headers", []).extend(headers)


async def enforce(
    request: Request,
    limiter: RateLimiter,
    policy_name: str,
    identity: str,
    *,
    read_keys: Sequence[str] = (),
) -> Decision:
    """Spend a token, put the RateLimit fields on the response, and 429 when refused."""
    decision = await limiter.hit(policy_name, identity, read_keys=read_keys)
    add_response_headers(request, decision.headers())
    if not decision.allowed:
        raise RateLimited(
            f"Too many requests for the {policy_name!r} policy; retry in "
            f"{max(1, decision.retry_after)} s."
        )
    return decision


# Policies keyed by the client address whatever token is sent (credential guessing).
IP_POLICIES = frozenset({"auth"})


async def spend_token(request: Request, policy_name: str) -> Decision | None:
    """Spend one token of `policy_name` for this request's caller; 429 when refused."""
    limiter = get_state(request)["limiter"]
    if not limiter.enabled:
        return None
    identity = request_identity(request, by_ip=policy_name in IP_POLICIES)
    return await enforce(request, limiter, policy_name, identity)


def rate_limit(policy_name: str) -> Any:
    """A route dependency spending one token of `policy_name`; 429 when the bucket is empty."""

    async def spend(request: Request) -> Decision | None:
        return await spend_token(request, policy_name)

    return Depends(spend)
