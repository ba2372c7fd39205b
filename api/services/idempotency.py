"""Exactly-once order creation under an `Idempotency-Key` (SPEC §5).

The key's record lives in PostgreSQL and is written by the statement that writes the
order (`query.orders.create_order_once`), so "order exists" and "its response is
stored" commit or vanish together.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
import orjson

from api.database.query import idempotency as key_queries
from api.database.query import orders as order_queries
from api.errors import IdempotencyKeyInUse, IdempotencyKeyReused, Unauthorized
from api.schemas.orders import OrderCreate
from api.services.orders import build_order

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


# A statement that found the key neither stored nor free raced a twin's commit; the next
# attempt sees the stored response. More than this many such races in a row is a conflict.
MAX_ATTEMPTS = 3


async def create_order_once(
    conn: asyncpg.Connection,
    *,
    user_id: uuid.UUID,
    key: str,
    payload: OrderCreate,
    request_id: str | None,
    ttl: timedelta,
) -> CreateOutcome:
    """Create the order for (user, key) once; a repeat replays the stored first response.

    Raises IdempotencyKeyInUse while another request holds the key,
    IdempotencyKeyReused when the key was first used with a different body and
    Unauthorized when the caller's account no longer exists.
    """
    digest = request_hash(payload)
    for _ in range(MAX_ATTEMPTS):
        new, created = build_order(user_id=user_id, payload=payload, request_id=request_id)
        row = await order_queries.create_order_once(
            conn,
            new,
            key=key,
            lock_name=key_queries.lock_name(user_id, key),
            request_hash=digest,
            status_code=CREATED,
            response_body=created.body,
            ttl=ttl,
        )
        if not row["caller_exists"]:
            raise Unauthorized("The access token is not valid.")
        if not row["held"]:
            break
        if row["created"]:
            return CreateOutcome(CREATED, created.body, created.id, replayed=False)
        if row["request_hash"] is not None:
            if not hmac.compare_digest(row["request_hash"], digest):
                raise IdempotencyKeyReused("This Idempotency-Key was used with a different body.")
            return CreateOutcome(
                row["status_code"], row["response_body"], row["order_id"], replayed=True
            )
    raise IdempotencyKeyInUse("A request with this Idempotency-Key is still in progress.")
