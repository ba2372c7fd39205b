"""Fixtures for the fault tests: the service as real uvicorn processes on this run's resources."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from api.configs import Settings
from tests.faults.service import RunningService, running_service
from tests.services import fault_lock


@pytest.fixture(autouse=True)
async def hold_fault_lock() -> AsyncIterator[None]:
    """Each fault test owns the machine's services for its whole run: no other run's fault
    lands in the middle of its measurement (the context managers in tests/services.py
    re-enter the lock)."""
    async with fault_lock():
        yield


StartService = Callable[..., contextlib.AbstractAsyncContextManager[RunningService]]


@pytest.fixture
def start_service(
    settings: Settings, database: str, redis: Redis, rabbit_cleanup: None, tmp_path: Path
) -> StartService:
    """`async with start_service(VAR="value") as service:` — `python -m api`, WORKERS=2."""

    def start(**extra: Any) -> contextlib.AbstractAsyncContextManager[RunningService]:
        return running_service(
            settings, tmp_path, **{key: str(value) for key, value in extra.items()}
        )

    return start
