"""The limit of a route: whose bucket a request spends from, its headers, the 429."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import Any

from fastapi import Depends, Request

from api.dependencies.caller import bearer_token, token_subject
from api.errors import ProblemError, RateLimited
from api.helpers.auth import decode_access_token
from api.redis_core.rate_limiter import Decision, RateLimiter
from api.state import get_state

# Policies keyed by the client address whatever token is sent (credential guessing).
IP_POLICIES = frozenset({"auth"})


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


def user_identity(user_id: uuid.UUID) -> str:
    """A user's rate-limit identity; also the hash tag of their cache keys."""
    return f"user:{user_id}"


def ip_identity(request: Request) -> str:
    return f"ip:{client_ip(request, get_state(request)['trusted_proxies'])}"


def request_identity(request: Request, *, by_ip: bool = False) -> str:
    """`user:<id>` for a valid bearer token, else (or when `by_ip`) `ip:<address>`."""
    if by_ip:
        return ip_identity(request)
    state = request.scope["state"]
    cached: str | None = state.get("rate_limit_identity")
    if cached is not None:
        return cached
    identity: str | None = None
    token = bearer_token(request)
    if token:
        try:
            identity = user_identity(decode_access_token(get_state(request)["settings"], token))
        except ProblemError:
            identity = None
    if identity is None:
        identity = ip_identity(request)
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


async def limited_creator(request: Request) -> uuid.UUID:
    """Spend an ORDERS_CREATE token, then the caller the bearer token names.

    One dependency for both (FastAPI's per-dependency work costs more than either
    step); the statement that creates the order checks the user still exists.
    """
    await spend_token(request, "orders_create")
    return token_subject(request, bearer_token(request))
