"""SQL for idempotency keys: the per-key lock, the stored first response and its expiry."""

from __future__ import annotations

import uuid

from sqlalchemy import func
from sqlalchemy.ext.asyncio import AsyncSession

from api.database.query.batches import delete_batch
from api.models import IdempotencyKey

# Namespaces the advisory-lock key, so other users of the bigint lock space cannot collide.
_LOCK_NAMESPACE = "idempotency-key:"


def lock_name(user_id: uuid.UUID, key: str) -> str:
    """What the advisory lock of (user, key) is hashed from."""
    return f"{_LOCK_NAMESPACE}{user_id}:{key}"


async def delete_expired_keys(session: AsyncSession, *, batch_size: int) -> int:
    """Delete up to `batch_size` expired records, skipping rows a request holds; the count."""
    return await delete_batch(
        session,
        (IdempotencyKey.user_id, IdempotencyKey.key),
        IdempotencyKey.expires_at < func.now(),
        limit=batch_size,
    )
