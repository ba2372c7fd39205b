"""SQL for the status consumer's ledger of applied `message_id`s."""

from __future__ import annotations

from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from api.models import ProcessedMessage


async def record_processed_message(session: AsyncSession, *, message_id: str) -> bool:
    """Claim `message_id` in the caller's transaction; False when it was already applied.

    A concurrent transaction holding the same id makes this wait for it, so two
    deliveries of one message can never both apply.
    """
    result = await session.execute(
        pg_insert(ProcessedMessage)
        .values(message_id=message_id)
        .on_conflict_do_nothing(index_elements=[ProcessedMessage.message_id])
        .returning(ProcessedMessage.message_id)
    )
    return result.first() is not None
