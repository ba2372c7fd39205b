"""Order state changes, each written with its event in the caller's transaction."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import RowMapping
from sqlalchemy.ext.asyncio import AsyncSession

from api.database.query import orders as order_queries
from api.database.query.outbox import insert_outbox_event
from api.errors import InvalidTransition, NotFound, PreconditionFailed
from api.events import EventType, order_event
from api.helpers.enums import OrderStatus, can_transition
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


def encode_order(order: RowMapping | OrderRead) -> EncodedOrder:
    """Serialise an order row or model; both give the same bytes for the same version."""
    fields = order.model_dump() if isinstance(order, OrderRead) else dict(order)
    return EncodedOrder(id=fields["id"], version=fields["version"], body=_dumps(fields))


async def create_order(
    session: AsyncSession, *, user_id: uuid.UUID, payload: OrderCreate, request_id: str | None
) -> EncodedOrder:
    """Insert a pending order with server-computed totals and its `order.created` event."""
    items: list[dict[str, Any]] = [
        {
            "sku": item.sku,
            "name": item.name,
            "quantity": item.quantity,
            "line_total": item.quantity * item.unit_price,
            "unit_price": item.unit_price,
        }
        for item in payload.items
    ]
    row = await order_queries.insert_order(
        session,
        order_id=uuid.uuid4(),
        user_id=user_id,
        currency=payload.currency,
        items=items,
        total_amount=sum(item["line_total"] for item in items),
        metadata=payload.metadata,
    )
    order = OrderRead.model_validate(row)
    await insert_outbox_event(
        session, order_event(order, event_type=EventType.CREATED, request_id=request_id)
    )
    return encode_order(row)


async def read_order(
    session: AsyncSession, *, order_id: uuid.UUID, owner_id: uuid.UUID | None
) -> EncodedOrder | None:
    """The order serialised, or None when it does not exist or (with `owner_id`) is not theirs."""
    row = await order_queries.get_order_mapping(session, order_id=order_id, owner_id=owner_id)
    return encode_order(row) if row is not None else None


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
