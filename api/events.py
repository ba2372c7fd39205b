"""Order events: the CloudEvents 1.0 envelope written to the outbox (SPEC §8).

The same Pydantic models generate the AsyncAPI document, so the contract and the
bytes on the wire cannot drift apart.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, Field

from api.helpers.enums import OrderStatus
from api.helpers.orjson_coder import dumps
from api.schemas.orders import OrderRead
from api.tracing import trace_headers

APP_ID = "orders-api"  # the AMQP `app_id` of every event
CONTENT_TYPE = "application/cloudevents+json"
# One CloudEvents source per order: the sequence extension orders the events of one
# source, by plain string comparison, hence the zero padding (SPEC §8).
SOURCE_PREFIX = "/v1/orders/"
SEQUENCE_DIGITS = 20


def event_source(order_id: uuid.UUID | str) -> str:
    """`/v1/orders/<id>`: the order's own URI reference."""
    return f"{SOURCE_PREFIX}{order_id}"


def event_sequence(version: int) -> str:
    """The order version, zero-padded so that string order is version order."""
    return f"{version:0{SEQUENCE_DIGITS}d}"


class EventType(StrEnum):
    """Event types, which are also the routing keys."""

    CREATED = "order.created"
    PAID = "order.paid"
    SHIPPED = "order.shipped"
    DELIVERED = "order.delivered"
    CANCELLED = "order.cancelled"

    @classmethod
    def for_status(cls, status: OrderStatus) -> EventType:
        """The event announcing that an order reached `status`."""
        return _EVENT_FOR_STATUS[status]


_EVENT_FOR_STATUS = {
    OrderStatus.PENDING: EventType.CREATED,
    OrderStatus.PAID: EventType.PAID,
    OrderStatus.SHIPPED: EventType.SHIPPED,
    OrderStatus.DELIVERED: EventType.DELIVERED,
    OrderStatus.CANCELLED: EventType.CANCELLED,
}


class OrderEventData(OrderRead):
    """The order body; `previous_status` is present on transitions only."""

    previous_status: OrderStatus | None = Field(
        default=None, description="The status before this change (absent on order.created)."
    )


class OrderEvent(BaseModel):
    """A CloudEvents 1.0 structured-mode envelope."""

    specversion: Literal["1.0"] = "1.0"
    id: uuid.UUID = Field(description="Event id; also the AMQP message_id. Stable on redelivery.")
    source: str = Field(
        pattern=r"^/v1/orders/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
        description="`/v1/orders/<order id>`: one source per order, so `sequence` orders "
        "all the events of a source.",
        examples=["/v1/orders/3f1c9a6e-8d2b-4c55-9e1a-2b7d4f0c8a91"],
    )
    type: EventType
    subject: str = Field(description="The order id.")
    time: datetime
    datacontenttype: Literal["application/json"] = "application/json"
    sequence: str = Field(
        pattern=rf"^[0-9]{{{SEQUENCE_DIGITS}}}$",
        description="The order version, zero-padded to 20 digits (CloudEvents sequence "
        "extension: plain string comparison orders the events of one source).",
        examples=["00000000000000000002"],
    )
    data: OrderEventData
    traceparent: str | None = Field(
        default=None,
        description="W3C trace context of the change (distributed-tracing extension; "
        "present when tracing is on).",
    )
    tracestate: str | None = Field(
        default=None, description="W3C trace state, with `traceparent` when there is one."
    )


class StatusUpdateMessage(BaseModel):
    """What a processor publishes to the status queue (with an AMQP `message_id`)."""

    order_id: uuid.UUID
    status: OrderStatus
    reason: str | None = Field(default=None, max_length=1000)


@dataclass(frozen=True, slots=True)
class NewOutboxEvent:
    """An event ready for the outbox: the envelope serialised once, here."""

    event_id: uuid.UUID
    routing_key: str
    body: bytes
    correlation_id: str | None
    traceparent: str | None = None
    tracestate: str | None = None


def order_event(
    order: OrderRead | Mapping[str, Any],
    *,
    event_type: EventType,
    request_id: str | None,
    previous_status: OrderStatus | None = None,
) -> NewOutboxEvent:
    """Build the envelope for a change to `order` (its state after the change).

    `order` is the model, or its fields as `OrderRead` has them (a new order's, before
    any row exists); both give the same bytes.
    """
    event_id = uuid.uuid4()
    data = order.model_dump(mode="json") if isinstance(order, OrderRead) else dict(order)
    if previous_status is not None:
        data["previous_status"] = previous_status.value
    envelope = {
        "specversion": "1.0",
        "id": str(event_id),
        "source": event_source(data["id"]),
        "type": event_type.value,
        "subject": str(data["id"]),
        "time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "sequence": event_sequence(data["version"]),
        "data": data,
    }
    # The trace of the change, when tracing is on (CloudEvents distributed-tracing extension).
    context = trace_headers()
    envelope.update(context)
    return NewOutboxEvent(
        event_id=event_id,
        routing_key=event_type.value,
        body=dumps(envelope),
        correlation_id=request_id,
        traceparent=context.get("traceparent"),
        tracestate=context.get("tracestate"),
    )
