"""SQL for orders. Reads return `OrderRead` schemas, never ORM objects."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import Row, func, select, update
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
