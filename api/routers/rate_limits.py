"""`GET /v1/rate-limits`: the caller's buckets, read without spending a token."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from pydantic import BaseModel

from api.dependencies.limits import IP_POLICIES, request_identity
from api.state import get_state

router = APIRouter(prefix="/v1", tags=["rate limits"])


class PolicyState(BaseModel):
    name: str
    quota: int
    window: int
    remaining: int
    reset: int


class RateLimitsRead(BaseModel):
    policies: list[PolicyState]


@router.get("/rate-limits", response_model=RateLimitsRead)
async def read_rate_limits(request: Request) -> RateLimitsRead:
    """The caller's bucket for every policy (by user for a valid token, else by IP)."""
    limiter = get_state(request)["limiter"]
    names = list(limiter.policies)
    decisions = await asyncio.gather(
        *(
            limiter.hit(name, request_identity(request, by_ip=name in IP_POLICIES), cost=0)
            for name in names
        )
    )
    return RateLimitsRead(
        policies=[
            PolicyState(
                name=d.policy.name,
                quota=d.policy.quota,
                window=d.policy.window,
                remaining=d.remaining,
                reset=d.reset,
            )
            for d in decisions
        ]
    )
