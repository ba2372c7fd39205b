"""Argon2id password hashing off the event loop, with a dummy hash for unknown users."""

from __future__ import annotations

import contextlib
import os
import secrets
from enum import Enum
from functools import cached_property, lru_cache

import anyio.to_thread
from anyio import CapacityLimiter
from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError

from api.configs import Settings

# Argon2 is CPU- and memory-bound and releases the GIL, so more threads than cores only
# queue memory (ARGON2_MEMORY_COST KiB each). A dedicated limiter keeps a login burst off
# AnyIO's shared thread pool, which FastAPI needs for sync dependencies.
HASHING_CONCURRENCY = max(1, os.cpu_count() or 1)
_limiter = CapacityLimiter(HASHING_CONCURRENCY)


class Verification(Enum):
    FAILED = "failed"
    OK = "ok"
    OK_NEEDS_REHASH = "ok-needs-rehash"


class PasswordHashing:
    """One argon2id `PasswordHasher` whose work runs in bounded worker threads."""

    def __init__(self, *, time_cost: int, memory_cost: int, parallelism: int) -> None:
        self._hasher = PasswordHasher(
            time_cost=time_cost,
            memory_cost=memory_cost,
            parallelism=parallelism,
            type=Type.ID,
        )

    @cached_property
    def _dummy_hash(self) -> str:
        # A real hash with the current parameters: verifying an unknown email costs what a
        # wrong password costs, so neither the answer nor its timing reveals who exists.
        return self._hasher.hash(secrets.token_urlsafe(32))

    async def hash(self, password: str) -> str:
        """The argon2id hash of `password`, computed off the event loop."""
        return await anyio.to_thread.run_sync(self._hasher.hash, password, limiter=_limiter)

    async def verify(self, password_hash: str | None, password: str) -> Verification:
        """Check `password` against `password_hash` (None: an unknown user) off the event loop."""
        return await anyio.to_thread.run_sync(
            self._verify, password_hash, password, limiter=_limiter
        )

    def _verify(self, password_hash: str | None, password: str) -> Verification:
        if password_hash is None:
            with contextlib.suppress(VerificationError):
                self._hasher.verify(self._dummy_hash, password)
            return Verification.FAILED
        try:
            self._hasher.verify(password_hash, password)
        except (VerificationError, InvalidHashError):
            return Verification.FAILED
        if self._hasher.check_needs_rehash(password_hash):
            return Verification.OK_NEEDS_REHASH
        return Verification.OK


@lru_cache(maxsize=8)
def _hashing_for(time_cost: int, memory_cost: int, parallelism: int) -> PasswordHashing:
    return PasswordHashing(time_cost=time_cost, memory_cost=memory_cost, parallelism=parallelism)


def password_hashing(settings: Settings) -> PasswordHashing:
    """The process-wide hasher for the ARGON2_* parameters of `settings`."""
    return _hashing_for(
        settings.ARGON2_TIME_COST, settings.ARGON2_MEMORY_COST, settings.ARGON2_PARALLELISM
    )
