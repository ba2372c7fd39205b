"""SQL for orders. Reads return `OrderRead` schemas or plain rows, never ORM objects.

The hottest statements (read one order, place one order) are hand-written for asyncpg
and run on a `raw_connection`: each is one round trip in its own transaction, the
caller's existence and role checked in the same statement. The rest go through
SQLAlchemy Core in the request's session.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg
from sqlalchemy import Row, RowMapping, func, insert, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession

from api.helpers.enums import OrderStatus
from api.models import Order
from api.schemas.orders import OrderRead

ORDER_COLUMNS = (
    Order.id,
    Order.user_id,
    Order.status,
    Order.currency,
    Order.items,
    Order.total_amount,
    Order.metadata_.label("metadata"),
    Order.version,
    Order.created_at,
    Order.updated_at,
)


# Column names as the response has them; `metadata` is an attribute name the ORM reserves.
RAW_ORDER_COLUMNS = (
    "o.id, o.user_id, o.status, o.currency, o.items, o.total_amount, o.metadata, o.version,"
    " o.created_at, o.updated_at"
)

# The viewer's role and the order, when it exists and the viewer may see it (owner or
# admin); no row at all when the viewer's account no longer exists.
_READ_ORDER_AS = f"""
SELECT u.role AS viewer_role, {RAW_ORDER_COLUMNS}
FROM users AS u
LEFT JOIN orders AS o ON o.id = $2 AND (o.user_id = u.id OR u.role = 'admin')
WHERE u.id = $1
"""


@dataclass(frozen=True, slots=True)
class NewOrder:
    """An order built in full by the caller (ids, totals, timestamps), with its event."""

    id: uuid.UUID
    user_id: uuid.UUID
    currency: str
    items_json: str
    total_amount: int
    metadata_json: str
    created_at: datetime
    event_id: uuid.UUID
    routing_key: str
    event_body: bytes
    correlation_id: str | None
    traceparent: str | None
    tracestate: str | None


# The order and its outbox row, inserted from the rows of `{source}` (none: nothing is
# written). Appended to a WITH list whose statement binds the parameters below.
_INSERT_ORDER_AND_EVENT = """
new_order AS (
    INSERT INTO orders (id, user_id, currency, items, total_amount, metadata,
                        created_at, updated_at)
    SELECT $2, $1, $3, $4, $5, $6, $7, $7 FROM {source}
    RETURNING id
),
new_event AS (
    INSERT INTO outbox (event_id, routing_key, body, correlation_id, traceparent, tracestate,
                        order_id)
    SELECT $8, $9, $10, $11, $12, $13, id FROM new_order
)
"""

_CREATE_ORDER = f"""
WITH caller AS (SELECT id FROM users WHERE id = $1),
{_INSERT_ORDER_AND_EVENT.format(source="caller")}
SELECT EXISTS (SELECT FROM caller) AS caller_exists,
       (SELECT count(*) FROM new_order) AS created
"""

# Place the order under an idempotency key, in one statement (one transaction):
# - `lock`: a transaction lock on (user, key) without waiting: a twin in flight → not held;
# - `stored`: the unexpired first response, when the key was used before;
# - `claimed`: the key's record for this order, only when the lock is held and nothing
#   is stored; the primary key decides between racers (an expired record is replaced);
# - the order and its event only when the key was claimed.
# A twin that committed after this statement's snapshot but before it took the lock is
# invisible to `stored` yet blocks `claimed`: held, nothing stored, nothing created. The
# caller runs the statement again; its new snapshot sees the stored response.
_CREATE_ORDER_ONCE = f"""
WITH lock AS (SELECT pg_try_advisory_xact_lock(hashtextextended($19, 0)) AS held),
caller AS (SELECT id FROM users WHERE id = $1),
stored AS (
    SELECT request_hash, status_code, response_body, order_id
    FROM idempotency_keys
    WHERE user_id = $1 AND key = $14 AND expires_at > now()
),
claimed AS (
    INSERT INTO idempotency_keys AS k
        (user_id, key, request_hash, status_code, response_body, order_id, expires_at,
         created_at)
    SELECT caller.id, $14, $15, $16, $17, $2, now() + $18::interval, now()
    FROM caller, lock
    WHERE lock.held AND NOT EXISTS (SELECT FROM stored)
    ON CONFLICT (user_id, key) DO UPDATE
        SET request_hash = excluded.request_hash,
            status_code = excluded.status_code,
            response_body = excluded.response_body,
            order_id = excluded.order_id,
            expires_at = excluded.expires_at,
            created_at = excluded.created_at
        WHERE k.expires_at <= now()
    RETURNING k.order_id
),
{_INSERT_ORDER_AND_EVENT.format(source="claimed")}
SELECT lock.held,
       EXISTS (SELECT FROM caller) AS caller_exists,
       (SELECT count(*) FROM new_order) AS created,
       stored.request_hash, stored.status_code, stored.response_body, stored.order_id
FROM lock LEFT JOIN stored ON true
"""


async def read_order_as(
    conn: asyncpg.Connection, *, order_id: uuid.UUID, viewer_id: uuid.UUID
) -> asyncpg.Record | None:
    """`viewer_role` and the order's columns (all None when the viewer may not see it).

    None when the viewer's account no longer exists.
    """
    return await conn.fetchrow(_READ_ORDER_AS, viewer_id, order_id)


def _order_arguments(order: NewOrder) -> tuple[object, ...]:
    return (
        order.user_id,
        order.id,
        order.currency,
        order.items_json,
        order.total_amount,
        order.metadata_json,
        order.created_at,
        order.event_id,
        order.routing_key,
        order.event_body,
        order.correlation_id,
        order.traceparent,
        order.tracestate,
    )


async def create_order(conn: asyncpg.Connection, order: NewOrder) -> bool:
    """Insert the order and its event; False (nothing written) when the user is gone."""
    row = await conn.fetchrow(_CREATE_ORDER, *_order_arguments(order))
    return bool(row["created"])


async def create_order_once(
    conn: asyncpg.Connection,
    order: NewOrder,
    *,
    key: str,
    lock_name: str,
    request_hash: bytes,
    status_code: int,
    response_body: bytes,
    ttl: timedelta,
) -> asyncpg.Record:
    """Insert the order, its event and the key's record, unless the key is held or used.

    `lock_name` names the key's advisory lock (`idempotency.lock_name`). The row has
    `held`, `caller_exists`, `created` (0 or 1) and, when the key was used before, the
    stored `request_hash`, `status_code`, `response_body` and `order_id`.
    """
    row: asyncpg.Record = await conn.fetchrow(
        _CREATE_ORDER_ONCE,
        *_order_arguments(order),
        key,
        request_hash,
        status_code,
        response_body,
        ttl,
        lock_name,
    )
    return row


def order_from_row(row: Row[tuple[object, ...]]) -> OrderRead:
    return OrderRead.model_validate(row._mapping)


@dataclass(frozen=True, slots=True)
class LockedOrder:
    status: OrderStatus
    version: int


async def get_order(
    session: AsyncSession, *, order_id: uuid.UUID, owner_id: uuid.UUID | None
) -> OrderRead | None:
    """The order, or None when it does not exist or (with `owner_id`) is someone else's."""
    query = select(*ORDER_COLUMNS).where(Order.id == order_id)
    if owner_id is not None:
        query = query.where(Order.user_id == owner_id)
    row = (await session.execute(query)).first()
    return order_from_row(row) if row is not None else None


async def lock_order(
    session: AsyncSession, *, order_id: uuid.UUID, owner_id: uuid.UUID | None
) -> LockedOrder | None:
    """Lock the order row for this transaction; concurrent writers queue behind it."""
    query = select(Order.status, Order.version).where(Order.id == order_id).with_for_update()
    if owner_id is not None:
        query = query.where(Order.user_id == owner_id)
    row = (await session.execute(query)).first()
    return LockedOrder(OrderStatus(row.status), row.version) if row is not None else None


async def set_order_status(
    session: AsyncSession, *, order_id: uuid.UUID, status: OrderStatus
) -> OrderRead:
    """Move a locked order to `status`, bumping its version by one."""
    result = await session.execute(
        update(Order)
        .where(Order.id == order_id)
        .values(status=status.value, version=Order.version + 1, updated_at=func.now())
        .returning(*ORDER_COLUMNS)
    )
    return order_from_row(result.one())


async def insert_order(
    session: AsyncSession,
    *,
    order_id: uuid.UUID,
    user_id: uuid.UUID,
    currency: str,
    items: list[dict[str, Any]],
    total_amount: int,
    metadata: dict[str, str],
) -> RowMapping:
    """Insert a new order (status and version from the column defaults) and return its row."""
    result = await session.execute(
        insert(Order)
        .values(
            id=order_id,
            user_id=user_id,
            currency=currency,
            items=items,
            total_amount=total_amount,
            metadata_=metadata,
        )
        .returning(*ORDER_COLUMNS)
    )
    return result.mappings().one()


async def get_order_mapping(
    session: AsyncSession, *, order_id: uuid.UUID, owner_id: uuid.UUID | None
) -> RowMapping | None:
    """The order's row as a mapping (no model built), scoped to `owner_id` when given."""
    query = select(*ORDER_COLUMNS).where(Order.id == order_id)
    if owner_id is not None:
        query = query.where(Order.user_id == owner_id)
    return (await session.execute(query)).mappings().first()


async def get_order_version(
    session: AsyncSession, *, order_id: uuid.UUID, owner_id: uuid.UUID | None
) -> int | None:
    """The order's current version (unlocked), scoped to `owner_id` when given."""
    query = select(Order.version).where(Order.id == order_id)
    if owner_id is not None:
        query = query.where(Order.user_id == owner_id)
    version: int | None = (await session.execute(query)).scalar_one_or_none()
    return version


async def list_orders(
    session: AsyncSession,
    *,
    owner_id: uuid.UUID | None,
    status: OrderStatus | None,
    before: tuple[datetime, uuid.UUID] | None,
    limit: int,
) -> Sequence[RowMapping]:
    """Up to `limit` orders, newest first, strictly after the keyset position `before`.

    Every filter combination has a matching `(…, created_at, id)` index, so this is a
    backward index scan that stops after `limit` rows, however deep the page.
    """
    query = select(*ORDER_COLUMNS)
    if owner_id is not None:
        query = query.where(Order.user_id == owner_id)
    if status is not None:
        query = query.where(Order.status == status.value)
    if before is not None:
        # A plain tuple on the right is bound with the column types of the left.
        query = query.where(tuple_(Order.created_at, Order.id) < before)
    query = query.order_by(Order.created_at.desc(), Order.id.desc()).limit(limit)
    return (await session.execute(query)).mappings().all()
