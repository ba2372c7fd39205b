"""SQL for orders. Reads return `OrderRead` schemas or plain rows, never ORM objects.

The hottest statements (read one order, place one order) are hand-written for asyncpg
and run on a `raw_connection`: each is one round trip in its own transaction, the
caller's existence and role checked in the same statement. The rest go through
SQLAlchemy Core in the request's session.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from operator import attrgetter
from typing import Any

import asyncpg
import orjson
from sqlalchemy import ColumnElement, Row, RowMapping, func, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession

from api.events import NewOutboxEvent
from api.helpers.enums import OrderStatus
from api.models import Order
from api.schemas.orders import OrderRead

# What every read returns: the columns of `OrderRead`'s fields, in its order (so an order
# serialised from a row and one serialised from the model are the same bytes). Labelled:
# a row's keys are then plain `str` (a column's own name may be a `quoted_name`, a str
# subclass that orjson refuses as a key).
ORDER_COLUMNS = tuple(Order.__table__.c[name].label(name) for name in OrderRead.model_fields)

# The viewer's role and the order, when it exists and the viewer may see it (owner or
# admin); no row at all when the viewer's account no longer exists.
_READ_ORDER_AS = f"""
SELECT u.role AS viewer_role, {", ".join(f"o.{column.name}" for column in ORDER_COLUMNS)}
FROM users AS u
LEFT JOIN orders AS o ON o.id = $2 AND (o.user_id = u.id OR u.role = 'admin')
WHERE u.id = $1
"""


@dataclass(frozen=True, slots=True)
class NewOrder:
    """An order built in full by the caller (ids, totals, timestamps), with its event.

    `fields` are the order's as `OrderRead` has them, the mapping its response body and
    its event are serialised from.
    """

    fields: Mapping[str, Any]
    event: NewOutboxEvent


Value = Callable[[NewOrder], object]


def _field(name: str) -> Value:
    return lambda order: order.fields[name]


def _jsonb(name: str) -> Value:
    # A raw connection binds JSONB as its text (the engine's codec, `connection.py`).
    return lambda order: orjson.dumps(order.fields[name]).decode()


# A new order's row: each column and how its value is read from the `NewOrder`. The
# INSERT's column list, its `$n` placeholders and its arguments are all generated from
# this table, in this order: a new column is one line here (plus its Alembic revision).
# `status` and `version` take their column defaults (`pending`, 1).
ORDER_INSERT: tuple[tuple[str, Value], ...] = (
    ("user_id", _field("user_id")),
    ("id", _field("id")),
    ("currency", _field("currency")),
    ("items", _jsonb("items")),
    ("total_amount", _field("total_amount")),
    ("metadata", _jsonb("metadata")),
    ("created_at", _field("created_at")),
    ("updated_at", _field("updated_at")),
)
_COLUMN_DEFAULTS = {"status", "version"}

# Its outbox row, the same way (`order_id` is the inserted order's id).
EVENT_INSERT: tuple[tuple[str, Value], ...] = (
    ("event_id", attrgetter("event.event_id")),
    ("routing_key", attrgetter("event.routing_key")),
    ("body", attrgetter("event.body")),
    ("correlation_id", attrgetter("event.correlation_id")),
    ("traceparent", attrgetter("event.traceparent")),
    ("tracestate", attrgetter("event.tracestate")),
)

# A field the API answers with but ORDER_INSERT does not store would be lost on the
# first read: refuse to start instead.
if _unstored := set(OrderRead.model_fields) - {c for c, _ in ORDER_INSERT} - _COLUMN_DEFAULTS:
    raise RuntimeError(f"ORDER_INSERT stores no value for {sorted(_unstored)}")

_ROW_VALUES = tuple(value for _, value in (*ORDER_INSERT, *EVENT_INSERT))
# The idempotency record's values, bound after the rows' by `create_order_once` only.
_KEY_VALUES = ("key", "request_hash", "status_code", "response_body", "ttl", "lock_name")


def _numbered(names: Sequence[str], first: int) -> dict[str, str]:
    return {name: f"${number}" for number, name in enumerate(names, first)}


# Each value's placeholder, by name: $1 … in the order of the tables above.
_ORDER_PARAM = _numbered([column for column, _ in ORDER_INSERT], 1)
_EVENT_PARAM = _numbered([column for column, _ in EVENT_INSERT], 1 + len(ORDER_INSERT))
_KEY_PARAM = _numbered(_KEY_VALUES, 1 + len(_ROW_VALUES))


def _insert_order_and_event(source: str) -> str:
    """The order and its outbox row, inserted from the rows of `source` (none: nothing is
    written); CTEs for a WITH list whose statement binds the rows' values."""
    return f"""new_order AS (
    INSERT INTO orders ({", ".join(_ORDER_PARAM)})
    SELECT {", ".join(_ORDER_PARAM.values())} FROM {source}
    RETURNING id
),
new_event AS (
    INSERT INTO outbox ({", ".join(_EVENT_PARAM)}, order_id)
    SELECT {", ".join(_EVENT_PARAM.values())}, id FROM new_order
)"""


_CREATE_ORDER = f"""
WITH caller AS (SELECT id FROM users WHERE id = {_ORDER_PARAM["user_id"]}),
{_insert_order_and_event("caller")}
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
WITH lock AS (
    SELECT pg_try_advisory_xact_lock(hashtextextended({_KEY_PARAM["lock_name"]}, 0)) AS held
),
caller AS (SELECT id FROM users WHERE id = {_ORDER_PARAM["user_id"]}),
stored AS (
    SELECT request_hash, status_code, response_body, order_id
    FROM idempotency_keys
    WHERE user_id = {_ORDER_PARAM["user_id"]} AND key = {_KEY_PARAM["key"]} AND expires_at > now()
),
claimed AS (
    INSERT INTO idempotency_keys AS k
        (user_id, key, request_hash, status_code, response_body, order_id, expires_at,
         created_at)
    SELECT caller.id, {_KEY_PARAM["key"]}, {_KEY_PARAM["request_hash"]},
           {_KEY_PARAM["status_code"]}, {_KEY_PARAM["response_body"]}, {_ORDER_PARAM["id"]},
           now() + {_KEY_PARAM["ttl"]}::interval, now()
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
{_insert_order_and_event("claimed")}
SELECT lock.held,
       EXISTS (SELECT FROM caller) AS caller_exists,
       (SELECT count(*) FROM new_order) AS created,
       stored.request_hash, stored.status_code, stored.response_body, stored.order_id
FROM lock LEFT JOIN stored ON true
"""


def _row_arguments(order: NewOrder) -> tuple[object, ...]:
    return tuple(value(order) for value in _ROW_VALUES)


async def read_order_as(
    conn: asyncpg.Connection, *, order_id: uuid.UUID, viewer_id: uuid.UUID
) -> asyncpg.Record | None:
    """`viewer_role` and the order's columns (all None when the viewer may not see it).

    None when the viewer's account no longer exists.
    """
    return await conn.fetchrow(_READ_ORDER_AS, viewer_id, order_id)


async def create_order(conn: asyncpg.Connection, order: NewOrder) -> bool:
    """Insert the order and its event; False (nothing written) when the user is gone."""
    row = await conn.fetchrow(_CREATE_ORDER, *_row_arguments(order))
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
    key_values = {
        "key": key,
        "request_hash": request_hash,
        "status_code": status_code,
        "response_body": response_body,
        "ttl": ttl,
        "lock_name": lock_name,
    }
    row: asyncpg.Record = await conn.fetchrow(
        _CREATE_ORDER_ONCE,
        *_row_arguments(order),
        *(key_values[name] for name in _KEY_VALUES),
    )
    return row


def order_from_row(row: Row[tuple[object, ...]]) -> OrderRead:
    return OrderRead.model_validate(row._mapping)


def _visible_to(owner_id: uuid.UUID | None) -> tuple[ColumnElement[bool], ...]:
    """The filter that limits orders to `owner_id`'s; none for None (an admin sees all).

    Another user's order is then "not found" by construction (one 404 for both).
    """
    return () if owner_id is None else (Order.user_id == owner_id,)


@dataclass(frozen=True, slots=True)
class LockedOrder:
    status: OrderStatus
    version: int


async def get_order(
    session: AsyncSession, *, order_id: uuid.UUID, owner_id: uuid.UUID | None
) -> OrderRead | None:
    """The order, or None when it does not exist or (with `owner_id`) is someone else's."""
    query = select(*ORDER_COLUMNS).where(Order.id == order_id, *_visible_to(owner_id))
    row = (await session.execute(query)).first()
    return order_from_row(row) if row is not None else None


async def lock_order(
    session: AsyncSession, *, order_id: uuid.UUID, owner_id: uuid.UUID | None
) -> LockedOrder | None:
    """Lock the order row for this transaction; concurrent writers queue behind it."""
    query = (
        select(Order.status, Order.version)
        .where(Order.id == order_id, *_visible_to(owner_id))
        .with_for_update()
    )
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


async def get_order_version(
    session: AsyncSession, *, order_id: uuid.UUID, owner_id: uuid.UUID | None
) -> int | None:
    """The order's current version (unlocked), scoped to `owner_id` when given."""
    query = select(Order.version).where(Order.id == order_id, *_visible_to(owner_id))
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
    query = select(*ORDER_COLUMNS).where(*_visible_to(owner_id))
    if status is not None:
        query = query.where(Order.status == status.value)
    if before is not None:
        # A plain tuple on the right is bound with the column types of the left.
        query = query.where(tuple_(Order.created_at, Order.id) < before)
    query = query.order_by(Order.created_at.desc(), Order.id.desc()).limit(limit)
    return (await session.execute(query)).mappings().all()
