"""Order state changes, each written with its event in the caller's transaction."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from api.database.query import orders as order_queries
from api.database.query.outbox import insert_outbox_event
from api.errors import InvalidTransition, NotFound, PreconditionFailed
from api.events import EventType, order_event
from api.helpers.enums import OrderStatus, can_transition
from api.schemas.orders import OrderRead


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
