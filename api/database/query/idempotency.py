"""SQL for idempotency keys: the per-key lock, the stored first response and its expiry."""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from api.database.query.batches import delete_batch
from api.models import IdempotencyKey

# Namespaces the advisory-lock key, so other users of the bigint lock space cannot collide.
_LOCK_NAMESPACE = "idempotency-key:"


def lock_name(user_id: uuid.UUID, key: str) -> str:
    """What the advisory lock of (user, key) is hashed from."""
    return f"{_LOCK_NAMESPACE}{user_id}:{key}"


async def try_lock_key(session: AsyncSession, *, user_id: uuid.UUID, key: str) -> bool:
    """Take the transaction-scoped lock of (user, key) without waiting; False when it is held."""
    lock_id = func.hashtextextended(lock_name(user_id, key), 0)
    acquired: bool = (
        await session.execute(select(func.pg_try_advisory_xact_lock(lock_id)))
    ).scalar_one()
    return acquired


async def store_response(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    key: str,
    request_hash: bytes,
    status_code: int,
    body: bytes,
    order_id: uuid.UUID | None,
    ttl: timedelta,
) -> None:
    """Store the first response for (user, key), replacing an expired record of the same key."""
    values = {
        "request_hash": request_hash,
        "status_code": status_code,
        "response_body": body,
        "order_id": order_id,
        "expires_at": func.now() + ttl,
        "created_at": func.now(),
    }
    statement = insert(IdempotencyKey).values(user_id=user_id, key=key, **values)
    statement = statement.on_conflict_do_update(
        index_elements=[IdempotencyKey.user_id, IdempotencyKey.key],
        set_=values,
        # Only an expired record is replaced; a live one is never overwritten.
        where=IdempotencyKey.expires_at <= func.now(),
    )
    await session.execute(statement)


async def delete_expired_keys(session: AsyncSession, *, batch_size: int) -> int:
    """Delete up to `batch_size` expired records, skipping rows a request holds; the count."""
    return await delete_batch(
        session,
        (IdempotencyKey.user_id, IdempotencyKey.key),
        IdempotencyKey.expires_at < func.now(),
        limit=batch_size,
    )
