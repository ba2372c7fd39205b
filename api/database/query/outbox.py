"""SQL for the transactional outbox."""

from __future__ import annotations

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession

from api.events import NewOutboxEvent
from api.models import OutboxEvent


async def insert_outbox_event(session: AsyncSession, event: NewOutboxEvent) -> None:
    """Write `event` in the caller's transaction; the insert trigger NOTIFYs relays on commit."""
    await session.execute(
        insert(OutboxEvent).values(
            event_id=event.event_id,
            routing_key=event.routing_key,
            body=event.body,
            correlation_id=event.correlation_id,
        )
    )
