"""SQL for the status consumer's ledger of applied `message_id`s."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from api.database.query.batches import delete_batch
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


async def delete_processed_messages(
    session: AsyncSession, *, older_than: timedelta, batch_size: int
) -> int:
    """Forget up to `batch_size` ids applied more than `older_than` ago; the number deleted.

    A redelivery of a message that old no longer counts as a duplicate: brokers redeliver
    within minutes, and a status already held is a no-op anyway.
    """
    return await delete_batch(
        session,
        (ProcessedMessage.message_id,),
        ProcessedMessage.processed_at < func.now() - older_than,
        limit=batch_size,
    )
