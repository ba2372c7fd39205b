"""SQL for orders. Reads return `OrderRead` schemas, never ORM objects."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

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
