"""A background task that deletes rows that no longer count, in small batches.

- expired idempotency records (lookups already ignore them, and a new first use of
  an expired key replaces its record);
- expired refresh tokens (refused whatever their row says);
- status-message ids applied more than PROCESSED_MESSAGE_RETENTION ago (brokers
  redeliver within minutes; a status already held is a no-op anyway).

Correctness never waits for it: it only keeps these tables from growing forever.
Every process runs one, but a lease (`services/leases.py`) lets only one of the
fleet sweep per interval; `SKIP LOCKED` never makes a request wait behind a sweep.
(Sent outbox rows are the relay's to delete.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.database.query.idempotency import delete_expired_keys
from api.database.query.processed_messages import delete_processed_messages
from api.database.query.users import delete_expired_refresh_tokens
from api.services.leases import give_up_lease, take_lease

logger = logging.getLogger(__name__)

SWEEP_INTERVAL_SECONDS = 300.0
LEASE_NAME = "retention-sweep"
SWEEP_BATCH_SIZE = 1000
# Bounds one sweep of a table, so a huge backlog is worked off over several sweeps.
SWEEP_MAX_BATCHES = 50
PROCESSED_MESSAGE_RETENTION = timedelta(days=7)

# One batch of one table: deletes at most `batch_size` rows, returns how many went.
DeleteBatch = Callable[[AsyncSession, int], Awaitable[int]]


async def _idempotency_keys(session: AsyncSession, batch_size: int) -> int:
    return await delete_expired_keys(session, batch_size=batch_size)


async def _refresh_tokens(session: AsyncSession, batch_size: int) -> int:
    return await delete_expired_refresh_tokens(session, batch_size=batch_size)


async def _processed_messages(session: AsyncSession, batch_size: int) -> int:
    return await delete_processed_messages(
        session, older_than=PROCESSED_MESSAGE_RETENTION, batch_size=batch_size
    )


TABLES: dict[str, DeleteBatch] = {
    "idempotency_keys": _idempotency_keys,
    "refresh_tokens": _refresh_tokens,
    "processed_messages": _processed_messages,
}


class RetentionSweeper:
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
        # Sweeps this process ran (it holds the lease for each).
        self.sweeps = 0

    def start(self) -> None:
        if self._closed:
            raise RuntimeError("the sweeper is closed")
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="retention-sweeper")

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            if self.sweeps:
                await give_up_lease(self._sessionmaker, name=LEASE_NAME)

    async def sweep(self) -> dict[str, int]:
        """Sweep every table, one short transaction per batch; the number deleted per table."""
        return {table: await self._sweep(delete) for table, delete in TABLES.items()}

    async def _sweep(self, delete: DeleteBatch) -> int:
        total = 0
        for _ in range(SWEEP_MAX_BATCHES):
            async with self._sessionmaker() as session, session.begin():
                deleted = await delete(session, self._batch_size)
            total += deleted
            if deleted < self._batch_size:
                break
        return total

    async def _run(self) -> None:
        period = timedelta(seconds=self._interval)
        while True:
            # Asked a few times per interval (jittered), so a lease given up by a stopped
            # process is taken soon by another.
            await asyncio.sleep(self._interval * random.uniform(0.2, 0.3))
            try:
                if not await take_lease(self._sessionmaker, name=LEASE_NAME, period=period):
                    continue
                self.sweeps += 1
                deleted = await self.sweep()
            except Exception as exc:  # the database may be down; try again next round
                logger.warning("retention sweep failed", extra={"error": type(exc).__name__})
            else:
                if any(deleted.values()):
                    logger.info("retention sweep", extra={"deleted": deleted})
