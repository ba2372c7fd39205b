"""Order state changes, each written with its event in the caller's transaction."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
from sqlalchemy.ext.asyncio import AsyncSession

from api.database.query import orders as order_queries
from api.database.query.orders import NewOrder
from api.database.query.outbox import insert_outbox_event
from api.errors import InvalidTransition, NotFound, PreconditionFailed, Unauthorized
from api.events import EventType, order_event
from api.helpers.auth import Principal
from api.helpers.enums import OrderStatus, UserRole, can_transition
from api.helpers.etags import order_etag
from api.helpers.pagination import decode_cursor, encode_cursor
from api.schemas.orders import OrderCreate, OrderRead

# A created order is at this version; its 201 (and every replay of it) carries this ETag.
INITIAL_VERSION = 1


@dataclass(frozen=True, slots=True)
class Transition:
    order: OrderRead
    previous_status: OrderStatus


async def transition_order(
    session: AsyncSession,
    *,
    order_id: uuid.UUID,
    target: OrderStatus,
    request_id: str | None,
    owner_id: uuid.UUID | None = None,
    expected_version: int | None = None,
) -> Transition:
    """Apply one state-machine move under a row lock and write its event.

    Raises NotFound (missing, or not `owner_id`'s), PreconditionFailed (stale
    `expected_version`) or InvalidTransition (a move the machine does not allow,
    including to the status the order already has). The caller commits.
    """
    current = await order_queries.lock_order(session, order_id=order_id, owner_id=owner_id)
    if current is None:
        raise NotFound("No such order.")
    if expected_version is not None and current.version != expected_version:
        raise PreconditionFailed(
            f"The order is at version {current.version}, not {expected_version}."
        )
    if not can_transition(current.status, target):
        raise InvalidTransition(f"An order cannot move from {current.status} to {target}.")
    order = await order_queries.set_order_status(session, order_id=order_id, status=target)
    await insert_outbox_event(
        session,
        order_event(
            order,
            event_type=EventType.for_status(target),
            request_id=request_id,
            previous_status=current.status,
        ),
        order_id=order.id,
    )
    return Transition(order=order, previous_status=current.status)


def _uuid_as_text(value: object) -> str:
    # asyncpg returns its own uuid.UUID subclass, which orjson only serialises through here.
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _dumps(value: Any) -> bytes:
    """orjson with the service's options (as `helpers.orjson_coder.dumps`), plus asyncpg UUIDs."""
    return orjson.dumps(value, default=_uuid_as_text, option=orjson.OPT_UTC_Z)


@dataclass(frozen=True, slots=True)
class EncodedOrder:
    """An order serialised once: the response body and what its ETag is made of."""

    id: uuid.UUID
    version: int
    body: bytes

    @property
    def etag(self) -> str:
        return order_etag(self.id, self.version)


def encode_order(order: Mapping[str, Any] | OrderRead) -> EncodedOrder:
    """Serialise an order row or model; both give the same bytes for the same version."""
    fields = order.model_dump() if isinstance(order, OrderRead) else dict(order)
    return EncodedOrder(id=fields["id"], version=fields["version"], body=_dumps(fields))


def _jsonb_order(mapping: dict[str, Any]) -> dict[str, Any]:
    # PostgreSQL keeps JSONB object keys shortest first, then bytewise: the same order
    # here makes a new order's bytes equal to every later read of it.
    return dict(sorted(mapping.items(), key=lambda item: (len(item[0].encode()), item[0])))


def build_order(
    *, user_id: uuid.UUID, payload: OrderCreate, request_id: str | None
) -> tuple[NewOrder, EncodedOrder]:
    """A pending order with server-computed totals, its response body and `order.created`.

    Ids and timestamps are made here, so the response and the event are serialised
    before the one statement that stores them.
    """
    items = [
        _jsonb_order(
            {
                "sku": item.sku,
                "name": item.name,
                "quantity": item.quantity,
                "line_total": item.quantity * item.unit_price,
                "unit_price": item.unit_price,
            }
        )
        for item in payload.items
    ]
    metadata = _jsonb_order(payload.metadata)
    now = datetime.now(UTC)
    fields: dict[str, Any] = {
        "id": uuid.uuid4(),
        "user_id": user_id,
        "status": OrderStatus.PENDING.value,
        "currency": payload.currency,
        "items": items,
        "total_amount": sum(item["line_total"] for item in items),
        "metadata": metadata,
        "version": INITIAL_VERSION,
        "created_at": now,
        "updated_at": now,
    }
    new = NewOrder(
        fields=fields,
        event=order_event(fields, event_type=EventType.CREATED, request_id=request_id),
    )
    return new, EncodedOrder(id=fields["id"], version=INITIAL_VERSION, body=_dumps(fields))


async def create_order(
    conn: asyncpg.Connection, *, user_id: uuid.UUID, payload: OrderCreate, request_id: str | None
) -> EncodedOrder:
    """Store a new pending order and its `order.created` event in one statement.

    Raises Unauthorized when the caller's account no longer exists.
    """
    new, encoded = build_order(user_id=user_id, payload=payload, request_id=request_id)
    if not await order_queries.create_order(conn, new):
        raise Unauthorized("The access token is not valid.")
    return encoded


async def read_order_as(
    conn: asyncpg.Connection, *, order_id: uuid.UUID, viewer_id: uuid.UUID
) -> tuple[Principal, EncodedOrder | None]:
    """The viewer as the database knows them, and the order serialised when they may see it.

    Raises Unauthorized when the viewer's account no longer exists.
    """
    row = await order_queries.read_order_as(conn, order_id=order_id, viewer_id=viewer_id)
    if row is None:
        raise Unauthorized("The access token is not valid.")
    viewer = Principal(id=viewer_id, role=UserRole(row["viewer_role"]))
    if row["id"] is None:
        return viewer, None
    fields = dict(row)
    del fields["viewer_role"]
    return viewer, encode_order(fields)


async def read_order_page(
    session: AsyncSession,
    *,
    owner_id: uuid.UUID | None,
    status: OrderStatus | None,
    cursor: str | None,
    limit: int,
) -> bytes:
    """One page of orders, newest first, serialised as `OrderPage`.

    Raises `InvalidCursor` for a cursor this API did not issue.
    """
    before = decode_cursor(cursor) if cursor is not None else None
    # One row more than asked tells whether another page exists without a COUNT.
    rows = await order_queries.list_orders(
        session, owner_id=owner_id, status=status, before=before, limit=limit + 1
    )
    page = [dict(row) for row in rows[:limit]]
    next_cursor = (
        encode_cursor(page[-1]["created_at"], page[-1]["id"]) if len(rows) > limit else None
    )
    return _dumps({"items": page, "next_cursor": next_cursor})
