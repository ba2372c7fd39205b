"""SQL for the transactional outbox.

The relay's batch (claim, mark sent, record a failure) runs on a raw asyncpg connection
in one transaction: the relay is CPU-bound at thousands of events a second, and
SQLAlchemy's work on a 500-row claim and its mark cost 4.1 ms of CPU a batch against
1.35 ms on asyncpg (measured; the whole batch costs about 60 ms). The rest goes through
the session.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from api.database.query.batches import delete_batch
from api.events import NewOutboxEvent
from api.models import OutboxEvent

# Longest `last_error` kept; the full trace belongs in the log, not in the row.
MAX_ERROR_LENGTH = 500


@dataclass(frozen=True, slots=True)
class ClaimedEvent:
    """An unsent outbox row, locked by the claiming transaction until it ends."""

    id: int
    event_id: uuid.UUID
    routing_key: str
    body: bytes
    correlation_id: str | None
    created_at: datetime
    traceparent: str | None
    tracestate: str | None

    @property
    def trace_carrier(self) -> dict[str, str]:
        """The W3C context of the change that wrote the event (empty when none was kept)."""
        carrier = {"traceparent": self.traceparent} if self.traceparent else {}
        if self.tracestate:
            carrier["tracestate"] = self.tracestate
        return carrier


# The columns of a `ClaimedEvent`, in its field order.
CLAIMED_COLUMNS = (
    OutboxEvent.id,
    OutboxEvent.event_id,
    OutboxEvent.routing_key,
    OutboxEvent.body,
    OutboxEvent.correlation_id,
    OutboxEvent.created_at,
    OutboxEvent.traceparent,
    OutboxEvent.tracestate,
)


async def insert_outbox_event(
    session: AsyncSession, event: NewOutboxEvent, *, order_id: uuid.UUID | None
) -> None:
    """Write `event` in the caller's transaction; the insert trigger NOTIFYs relays on commit."""
    await session.execute(
        insert(OutboxEvent).values(
            event_id=event.event_id,
            routing_key=event.routing_key,
            body=event.body,
            correlation_id=event.correlation_id,
            traceparent=event.traceparent,
            tracestate=event.tracestate,
            order_id=order_id,
        )
    )


# Orders are spread over this many partitions (a power of two: the SQL masks the
# hash); a claim holds a few of them at once.
OUTBOX_PARTITIONS = 64
MAX_PARTITIONS_PER_CLAIM = 16
# The advisory-lock namespace of the partitions (the two-int form of the lock; the
# idempotency keys use the one-bigint form, a separate key space).
PARTITION_LOCK_NAMESPACE = 0x4F42  # "OB"

# Claim the oldest unsent events of the partitions (of the order id) no other relay
# transaction holds:
# - `oldest`: the oldest $2 (scan) unsent rows and their partitions ($1: the mask);
# - `held`: the partitions among them, oldest first, whose transaction-scoped advisory
#   lock (namespace $3) this transaction gets without waiting (at most $4, so concurrent
#   relays share the work). `OFFSET 0` keeps the lock call out of the subquery (the
#   planner would otherwise push it into the aggregate, where it ran on every candidate
#   and took every free partition), so the outer LIMIT stops the calls at the
#   $4th lock it gets, oldest partition first;
# - those rows of `oldest` that are in a held partition, oldest first (at most $5),
#   locked, each with the number of rows `oldest` found (more than were claimed: work is
#   left for the next claim, by this relay or another). Their ids are collected into an
#   array first, so the rows are fetched by one index scan whatever the statistics say:
#   as a join of the table with the CTEs, a never-analysed outbox (autovacuum off, or a
#   new install) got a nested loop that took 678 ms for a claim of 100 rows, against
#   2.5 ms now.
# `oldest` is a prefix of the unsent rows, so what is claimed of a partition is a prefix
# of its unsent rows too, and nobody else can claim any of that partition's rows until
# this transaction has published and marked them: an order's event is published only
# after that order's earlier events (ids grow with an order's versions, its changes
# being serialised by the order's row lock). A row another transaction still locks is
# waited for, not skipped: skipping it would publish that order's next event first.
# Transaction-scoped advisory locks work behind PgBouncer in transaction mode.
_CLAIM = f"""
WITH oldest AS MATERIALIZED (
    SELECT id, hashtext(coalesce(order_id::text, '')) & $1 AS partition
    FROM outbox WHERE sent_at IS NULL ORDER BY id LIMIT $2
),
held AS MATERIALIZED (
    SELECT partition
    FROM (
        SELECT partition, min(id) AS first_id FROM oldest GROUP BY partition
        ORDER BY first_id OFFSET 0
    ) candidates
    WHERE pg_try_advisory_xact_lock($3, partition)
    LIMIT $4
)
SELECT {", ".join(column.name for column in CLAIMED_COLUMNS)},
       (SELECT count(*) FROM oldest) AS scanned
FROM outbox
WHERE id = ANY (ARRAY(
    SELECT id FROM oldest WHERE partition IN (SELECT partition FROM held) ORDER BY id LIMIT $5
))
  AND sent_at IS NULL
ORDER BY id
FOR UPDATE
"""  # noqa: S608 -- the column names come from the model, nothing from input

# The claim transaction's settings, sent before its claim:
# - the claim's scan must be the walk of `ix_outbox_unsent` in id order that stops at
#   its LIMIT. On an outbox never analysed (autovacuum off, as on the bench's machine,
#   or a new install), the planner prefers a bitmap scan and a sort, or a sequential
#   scan, which read every unsent row on every claim: draining a 20,000-event backlog,
#   a claim took 28-31 ms that way against 9-12 ms on the ordered walk. Planner switches
#   are the one stable way to say so; `SET LOCAL` ends with the transaction (PgBouncer).
#   One round trip per claim, which the mark no longer makes (an empty claim pays it);
# - its commit (the marks, a failure count) does not wait for its WAL flush: a stamp
#   lost in a PostgreSQL crash only means those rows are published again, same ids.
_CLAIM_SETTINGS = (
    "SET LOCAL enable_bitmapscan = off; SET LOCAL enable_seqscan = off; "
    "SET LOCAL synchronous_commit = off"
)
_MARK_SENT = "UPDATE outbox SET sent_at = now() WHERE id = ANY($1::bigint[])"
_RECORD_FAILURE = (
    "UPDATE outbox SET attempts = attempts + 1, last_error = $2 WHERE id = ANY($1::bigint[])"
)


@dataclass(frozen=True, slots=True)
class Claim:
    """The events one claim locked, and whether unsent rows were left unclaimed."""

    events: list[ClaimedEvent]
    more: bool


async def claim_outbox_batch(connection: asyncpg.Connection, *, limit: int) -> Claim:
    """Lock up to `limit` of the oldest unsent rows of partitions no other relay holds.

    In the caller's transaction, which the locks (and `_CLAIM_SETTINGS`) last as long as.
    """
    await connection.execute(_CLAIM_SETTINGS)
    rows = await connection.fetch(
        _CLAIM,
        OUTBOX_PARTITIONS - 1,
        # Enough rows that the partitions one claim may hold fill a batch.
        limit * OUTBOX_PARTITIONS // MAX_PARTITIONS_PER_CLAIM,
        PARTITION_LOCK_NAMESPACE,
        MAX_PARTITIONS_PER_CLAIM,
        limit,
    )
    events = [ClaimedEvent(*row[:-1]) for row in rows]
    # Nothing claimed says nothing of the rest: every partition may be held by others.
    return Claim(events, more=bool(rows) and rows[0]["scanned"] > len(rows))


async def mark_outbox_sent(connection: asyncpg.Connection, *, ids: Sequence[int]) -> None:
    """Stamp claimed rows as confirmed by the broker (in the claim's transaction)."""
    if ids:
        await connection.execute(_MARK_SENT, ids)


async def record_outbox_failure(
    connection: asyncpg.Connection, *, ids: Sequence[int], error: str
) -> None:
    """Count one more failed attempt on claimed rows, keeping the latest error."""
    if ids:
        await connection.execute(_RECORD_FAILURE, ids, error[:MAX_ERROR_LENGTH])


async def count_outbox_backlog(session: AsyncSession) -> int:
    """Rows not yet confirmed by the broker."""
    result = await session.execute(
        select(func.count()).select_from(OutboxEvent).where(OutboxEvent.sent_at.is_(None))
    )
    return int(result.scalar_one())


async def outbox_backlog_stats(session: AsyncSession) -> tuple[int, datetime | None]:
    """Rows not yet confirmed by the broker, and when the oldest of them was written."""
    result = await session.execute(
        select(func.count(), func.min(OutboxEvent.created_at)).where(OutboxEvent.sent_at.is_(None))
    )
    count, oldest = result.one()
    return int(count), oldest


async def delete_sent_outbox_events(
    session: AsyncSession, *, older_than: timedelta, limit: int
) -> int:
    """Delete up to `limit` rows sent more than `older_than` ago; returns how many went."""
    return await delete_batch(
        session, (OutboxEvent.id,), OutboxEvent.sent_at < func.now() - older_than, limit=limit
    )
