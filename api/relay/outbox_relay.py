"""The outbox relay: moves committed events from PostgreSQL to RabbitMQ, at least once.

A batch is claimed (the oldest unsent rows of the order partitions whose advisory lock
the transaction gets, rows locked `FOR UPDATE`), published, confirmed and marked sent
inside one transaction, so relays in many processes never publish the same row at once
nor an order's events out of order, and a relay that dies mid-batch leaves its rows
for the next one (a duplicate then keeps its event id). Wakes on NOTIFY, polls as a
fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from api.configs import Settings
from api.database.connection import raw_connection
from api.database.query import outbox as outbox_queries
from api.database.query.outbox import ClaimedEvent
from api.helpers.backoff import Backoff
from api.metrics import OUTBOX_BACKLOG, OUTBOX_FAILED, OUTBOX_PUBLISHED
from api.rabbit_core.client import CONNECT_TIMEOUT, RabbitClient, RabbitUnavailable
from api.rabbit_core.publisher import EventPublisher, describe_failure
from api.relay.notifications import OutboxNotifications
from api.services.leases import give_up_lease, take_lease

logger = logging.getLogger(__name__)

BACKLOG_REFRESH_INTERVAL = 1.0
CLEANUP_INTERVAL = 60.0
CLEANUP_LEASE = "outbox-cleanup"
CLEANUP_BATCH_SIZE = 1000
# Bounds one cleanup pass; the rest goes on the next pass.
CLEANUP_MAX_BATCHES = 20
# Batches in flight per relay while there is a backlog: one claims and marks in
# PostgreSQL while another awaits its confirms, so database round trips do not stall
# publishing. With no backlog only the first lane works.
DEFAULT_LANES = 2
# After a NOTIFY, wait this long before claiming, so the orders committed meanwhile go
# in the same batch: at 1,000 orders/s a claim per order (times every relay and lane
# woken by it) cost more worker CPU than the orders themselves. Adds as much to an
# event's delay.
NOTIFY_COALESCE_SECONDS = 0.01


@dataclass(frozen=True, slots=True)
class BatchResult:
    claimed: int
    failed: int
    error: BaseException | None = None
    # Unsent rows were left unclaimed: claim again now rather than sleep.
    more: bool = False


class OutboxRelay:
    """The relay of one process (a few lanes of batches); safe in many processes at once."""

    def __init__(
        self,
        settings: Settings,
        sessionmaker: async_sessionmaker[AsyncSession],
        rabbit: RabbitClient,
        *,
        lanes: int = DEFAULT_LANES,
    ) -> None:
        self._lanes = lanes
        self._nodes = settings.rabbitmq_nodes
        self._sessionmaker = sessionmaker
        # The batches run on the same pool's connections, raw (`query/outbox.py` says why).
        self._engine: AsyncEngine = sessionmaker.kw["bind"]
        self._rabbit = rabbit
        self._batch_size = settings.OUTBOX_BATCH_SIZE
        self._poll_interval = settings.OUTBOX_POLL_INTERVAL
        self._retention = timedelta(hours=settings.OUTBOX_RETENTION_HOURS)
        # The claim transaction stays open while the batch is confirmed; the confirm wait
        # must end before PostgreSQL's idle-in-transaction timeout kills the session.
        self.publish_timeout = max(0.1, settings.POSTGRES_TRANSACTION_TIMEOUT * 0.8)
        self._publisher = EventPublisher(rabbit, timeout=self.publish_timeout)
        self._wake = asyncio.Event()
        # Set while the first lane claims full batches: the other lanes help only then.
        self._backlog = asyncio.Event()
        self._stopping = asyncio.Event()
        self._notifications = OutboxNotifications(settings, self._wake.set)
        self._task: asyncio.Future[list[None]] | None = None
        self._failing = False
        # Events this relay has had confirmed and marked sent (also in OUTBOX_PUBLISHED).
        self.published = 0
        self._next_backlog_refresh = 0.0
        self._next_cleanup = 0.0
        # Cleanup passes this relay ran (each under the fleet's lease).
        self._cleanups = 0

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("OutboxRelay.start() may be called once")
        await self._notifications.start()
        self._task = asyncio.gather(
            *(
                asyncio.create_task(self._run(leader=lane == 0), name=f"outbox-relay-{lane}")
                for lane in range(self._lanes)
            )
        )

    async def stop(self, timeout: float | None = None) -> None:
        """Finish the batch in hand, then stop; a batch still running after `timeout` rolls back."""
        self._stopping.set()
        self._wake.set()
        self._backlog.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(
                    asyncio.shield(self._task), timeout or self.publish_timeout + 5
                )
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        await self._notifications.close()
        await self._publisher.close()
        if self._cleanups:
            await give_up_lease(self._sessionmaker, name=CLEANUP_LEASE)

    async def _run(self, *, leader: bool) -> None:
        """One lane: claim, publish and mark batches until stopped.

        The leader wakes on a NOTIFY (or every poll interval), keeps the metrics and the
        retention cleanup, and says when a backlog is there; the other lanes wait for that.
        A lane claims again at once while its claims leave unsent rows behind (a full
        batch, or rows of partitions it could not take), so a backlog is never left
        waiting for the poll interval.
        """
        await self._first_connection()
        backoff = Backoff()
        while not self._stopping.is_set():
            if leader:
                self._wake.clear()
                await self._housekeeping()
            try:
                result = await self._relay_batch()
            except Exception as exc:  # PostgreSQL or RabbitMQ away: retry later, never die
                result = BatchResult(claimed=0, failed=1, error=exc)
            if result.error is not None:
                self._note_failure(result)
                await self._sleep_until(self._stopping, backoff.next())
                continue
            self._note_success()
            backoff.reset()
            if result.more or result.claimed >= self._batch_size:
                if leader:
                    self._backlog.set()
                continue
            if not leader:
                # Helped enough: wait for the leader's next full batch, not the last one.
                self._backlog.clear()
                await self._sleep_until(self._backlog, self._poll_interval)
                continue
            self._backlog.clear()
            if await self._sleep_until(self._wake, self._poll_interval):
                await self._sleep_until(self._stopping, NOTIFY_COALESCE_SECONDS)

    async def _first_connection(self) -> None:
        """Give the client time to connect before the first batch.

        The relay starts with the process, before RabbitMQ is connected; without this
        wait every healthy start logged that the relay cannot publish. A broker that is
        really down is still reported, once this wait is over.
        """
        grace = CONNECT_TIMEOUT * len(self._nodes) + 1.0
        waiting = asyncio.ensure_future(self._rabbit.wait_connected(grace))
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait((waiting, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError, RabbitUnavailable, RuntimeError):
                await waiting

    async def _relay_batch(self) -> BatchResult:
        """Claim, publish, confirm and mark one batch in one transaction."""
        if not self._rabbit.is_connected:
            raise RabbitUnavailable("RabbitMQ is not connected")
        async with raw_connection(self._engine) as connection, connection.transaction():
            claim = await outbox_queries.claim_outbox_batch(connection, limit=self._batch_size)
            events = claim.events
            if not events:
                return BatchResult(claimed=0, failed=0)
            outcomes = await self._publisher.publish_batch(events)
            sent, failed, error = _split(events, outcomes)
            await outbox_queries.mark_outbox_sent(connection, ids=sent)
            if error is not None:
                await outbox_queries.record_outbox_failure(
                    connection, ids=failed, error=describe_failure(error)
                )
        OUTBOX_PUBLISHED.inc(len(sent))
        self.published += len(sent)
        if failed:
            OUTBOX_FAILED.inc(len(failed))
        return BatchResult(claimed=len(events), failed=len(failed), error=error, more=claim.more)

    async def _housekeeping(self) -> None:
        now = time.monotonic()
        try:
            if now >= self._next_backlog_refresh:
                self._next_backlog_refresh = now + BACKLOG_REFRESH_INTERVAL
                async with self._sessionmaker() as session, session.begin():
                    OUTBOX_BACKLOG.set(await outbox_queries.count_outbox_backlog(session))
            if now >= self._next_cleanup:
                # Asked a few times per interval; the lease lets one process per interval in.
                self._next_cleanup = now + CLEANUP_INTERVAL / 4
                period = timedelta(seconds=CLEANUP_INTERVAL)
                if await take_lease(self._sessionmaker, name=CLEANUP_LEASE, period=period):
                    self._cleanups += 1
                    await self._delete_old_sent_events()
        except Exception as exc:  # housekeeping never stops the relay
            logger.debug("outbox housekeeping failed", extra={"error": type(exc).__name__})

    async def _delete_old_sent_events(self) -> None:
        """Delete sent rows past retention in small batches, so no long lock is held."""
        for _ in range(CLEANUP_MAX_BATCHES):
            if self._stopping.is_set():
                return
            async with self._sessionmaker() as session, session.begin():
                deleted = await outbox_queries.delete_sent_outbox_events(
                    session, older_than=self._retention, limit=CLEANUP_BATCH_SIZE
                )
            if deleted < CLEANUP_BATCH_SIZE:
                return

    def _note_failure(self, result: BatchResult) -> None:
        assert result.error is not None
        extra = {"error": describe_failure(result.error), "failed": result.failed}
        if not self._failing:
            logger.warning("outbox relay cannot publish, backing off", extra=extra)
        else:
            logger.debug("outbox relay still cannot publish", extra=extra)
        self._failing = True

    def _note_success(self) -> None:
        if self._failing:
            logger.info("outbox relay publishing again")
        self._failing = False

    @staticmethod
    async def _sleep_until(event: asyncio.Event, seconds: float) -> bool:
        """Wait for `event` at most `seconds`; whether it was set."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), seconds)
        return event.is_set()


def _split(
    events: Sequence[ClaimedEvent], outcomes: Sequence[BaseException | None]
) -> tuple[list[int], list[int], BaseException | None]:
    """Row ids confirmed, row ids failed, and the first failure."""
    sent: list[int] = []
    failed: list[int] = []
    first_error: BaseException | None = None
    for event, outcome in zip(events, outcomes, strict=True):
        if outcome is None:
            sent.append(event.id)
        else:
            failed.append(event.id)
            first_error = first_error or outcome
    return sent, failed, first_error
