"""Exactly-once order creation under an `Idempotency-Key` (SPEC §5).

The key's record lives in PostgreSQL and is written in the order's own transaction,
so "order exists" and "its response is stored" commit or vanish together.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from dataclasses import dataclass
from datetime import timedelta

import orjson
from sqlalchemy.ext.asyncio import AsyncSession

from api.database.query import idempotency as key_queries
from api.errors import IdempotencyKeyInUse, IdempotencyKeyReused
from api.schemas.orders import OrderCreate
from api.services.orders import create_order

# 1-255 printable ASCII characters (space to tilde), as SPEC §5 allows.
IDEMPOTENCY_KEY_PATTERN = r"^[\x20-\x7E]{1,255}$"
CREATED = 201


@dataclass(frozen=True, slots=True)
class CreateOutcome:
    """The response to send: the first one, or a replay of it."""

    status_code: int
    body: bytes
    order_id: uuid.UUID | None
    replayed: bool


def request_hash(payload: OrderCreate) -> bytes:
    """SHA-256 of the validated body as canonical JSON (sorted keys, defaults filled in)."""
    canonical = orjson.dumps(payload.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).digest()


async def create_order_once(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    key: str,
    payload: OrderCreate,
    request_id: str | None,
    ttl: timedelta,
) -> CreateOutcome:
    """Create the order for (user, key) once; a repeat replays the stored first response.

    Raises IdempotencyKeyInUse while another request holds the key and
    IdempotencyKeyReused when the key was first used with a different body.
    """
    # A non-blocking transaction lock: a concurrent twin is refused at once instead of
    # holding a connection while it waits. The lock is released when this transaction
    # commits, so whoever takes it next sees the stored record.
    if not await key_queries.try_lock_key(session, user_id=user_id, key=key):
        raise IdempotencyKeyInUse("A request with this Idempotency-Key is still in progress.")
    # A separate statement after the lock (READ COMMITTED): its snapshot is taken once the
    # lock is ours, so a record committed by the previous holder is always visible.
    stored = await key_queries.get_stored_response(session, user_id=user_id, key=key)
    digest = request_hash(payload)
    if stored is not None:
        if not hmac.compare_digest(stored.request_hash, digest):
            raise IdempotencyKeyReused("This Idempotency-Key was used with a different body.")
        return CreateOutcome(stored.status_code, stored.body, stored.order_id, replayed=True)
    created = await create_order(session, user_id=user_id, payload=payload, request_id=request_id)
    await key_queries.store_response(
        session,
        user_id=user_id,
        key=key,
        request_hash=digest,
        status_code=CREATED,
        body=created.body,
        order_id=created.id,
        ttl=ttl,
    )
    return CreateOutcome(CREATED, created.body, created.id, replayed=False)
