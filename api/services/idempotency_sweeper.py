"""A background task that deletes expired idempotency records in small batches.

Correctness never waits for it: lookups ignore expired records and a new first
use of an expired key replaces the old record. It only keeps the table small.
Every process runs one; `SKIP LOCKED` lets them share the work and never makes a
request wait behind a sweep.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.database.query.idempotency import delete_expired_keys

logger = logging.getLogger(__name__)

SWEEP_INTERVAL_SECONDS = 300.0
SWEEP_BATCH_SIZE = 1000
# Bounds one sweep, so a huge backlog is worked off over several sweeps instead of at once.
SWEEP_MAX_BATCHES = 50


class IdempotencyKeySweeper:
    """Runs `sweep()` every `interval` seconds (with jitter) until `close()`."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        *,
        interval: float = SWEEP_INTERVAL_SECONDS,
        batch_size: int = SWEEP_BATCH_SIZE,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._interval = interval
        self._batch_size = batch_size
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        if self._closed:
            raise RuntimeError("the sweeper is closed")
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="idempotency-key-sweeper")

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def sweep(self) -> int:
        """Delete expired records, one short transaction per batch; the number deleted."""
        total = 0
        for _ in range(SWEEP_MAX_BATCHES):
            async with self._sessionmaker() as session, session.begin():
                deleted = await delete_expired_keys(session, batch_size=self._batch_size)
            total += deleted
            if deleted < self._batch_size:
                break
        return total

    async def _run(self) -> None:
        while True:
            # Jitter spreads the sweeps of many processes started together.
            await asyncio.sleep(self._interval * random.uniform(0.5, 1.5))
            try:
                deleted = await self.sweep()
            except Exception as exc:  # the database may be down; try again next round
                logger.warning("idempotency sweep failed", extra={"error": type(exc).__name__})
            else:
                if deleted:
                    logger.info("idempotency sweep", extra={"deleted": deleted})
