"""SQL for the transactional outbox."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import BigInteger, any_, bindparam, func, insert, select, text, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncSession

from api.database.query.batches import delete_batch
from api.events import NewOutboxEvent
from api.models import OutboxEvent

# Longest `last_error` kept; the full trace belongs in the log, not in the row.
MAX_ERROR_LENGTH = 500


def _id_array(ids: Sequence[int]) -> Any:
    # One array parameter, so the statement text (and its prepared plan) is the same for any size.
    return bindparam("ids", list(ids), type_=ARRAY(BigInteger))


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


async def insert_outbox_event(session: AsyncSession, event: NewOutboxEvent) -> None:
    """Write `event` in the caller's transaction; the insert trigger NOTIFYs relays on commit."""
    await session.execute(
        insert(OutboxEvent).values(
            event_id=event.event_id,
            routing_key=event.routing_key,
            body=event.body,
            correlation_id=event.correlation_id,
            traceparent=event.traceparent,
            tracestate=event.tracestate,
        )
    )


async def claim_outbox_batch(session: AsyncSession, *, limit: int) -> list[ClaimedEvent]:
    """Lock up to `limit` of the oldest unsent rows; rows another relay holds are skipped."""
    result = await session.execute(
        select(*CLAIMED_COLUMNS)
        .where(OutboxEvent.sent_at.is_(None))
        .order_by(OutboxEvent.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return [ClaimedEvent(*row) for row in result]


async def mark_outbox_sent(session: AsyncSession, *, ids: Sequence[int]) -> None:
    """Stamp claimed rows as confirmed by the broker.

    The transaction's commit does not wait for its WAL flush: a stamp lost in a
    PostgreSQL crash only means those rows are published again, with the same ids.
    """
    if ids:
        await session.execute(text("SET LOCAL synchronous_commit = off"))
        await session.execute(
            update(OutboxEvent)
            .where(OutboxEvent.id == any_(_id_array(ids)))
            .values(sent_at=func.now())
            # No ORM objects to keep in step: without this, the session works out the
            # identity of every updated row (a profiled 0.6 % of a worker under POST load).
            .execution_options(synchronize_session=False)
        )


async def record_outbox_failure(session: AsyncSession, *, ids: Sequence[int], error: str) -> None:
    """Count one more failed attempt on claimed rows, keeping the latest error."""
    if ids:
        await session.execute(
            update(OutboxEvent)
            .where(OutboxEvent.id == any_(_id_array(ids)))
            .values(attempts=OutboxEvent.attempts + 1, last_error=error[:MAX_ERROR_LENGTH])
            .execution_options(synchronize_session=False)
        )


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
