"""The AsyncAPI 3.0 document of the event contract, generated from the models in `api.events`.

One channel per routing key on the events exchange (what the service sends), the
events queue processors consume, the status queue (what the service receives),
and both dead-letter queues. Payload schemas come from the same Pydantic models
that build the messages, so the document cannot drift from the wire.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pydantic.json_schema import models_json_schema

from api.configs import Settings
from api.consumers.status import MAX_BODY_BYTES, DeadLetterReason
from api.events import CONTENT_TYPE, EventType, OrderEvent, StatusUpdateMessage
from api.helpers.orjson_coder import dumps
from api.rabbit_core.topology import TopologyNames

ASYNCAPI_VERSION = "3.0.0"
AMQP_BINDING_VERSION = "0.3.0"
SCHEMA_REF = "#/components/schemas/{model}"


@dataclass(frozen=True, slots=True)
class _Broker:
    host: str
    port: int
    vhost: str
    names: TopologyNames


def _ref(path: str) -> dict[str, str]:
    return {"$ref": path}


def _message_key(event_type: EventType) -> str:
    """`order.created` -> `orderCreated` (component and channel keys must be identifiers)."""
    head, tail = event_type.value.split(".")
    return head + tail.capitalize()


def _schemas() -> dict[str, Any]:
    _, top = models_json_schema(
        [(OrderEvent, "serialization"), (StatusUpdateMessage, "validation")],
        ref_template=SCHEMA_REF,
    )
    schemas: dict[str, Any] = top["$defs"]
    # The envelope always carries its constant fields; pydantic lists only those without
    # defaults. The distributed-tracing extension is there only when tracing is on.
    envelope = schemas["OrderEvent"]
    optional = {"traceparent", "tracestate"}
    envelope["required"] = [name for name in envelope["properties"] if name not in optional]
    return schemas


def _exchange_binding(broker: _Broker, name: str, kind: str) -> dict[str, Any]:
    return {
        "amqp": {
            "is": "routingKey",
            "exchange": {
                "name": name,
                "type": kind,
                "durable": True,
                "autoDelete": False,
                "vhost": broker.vhost,
            },
            "bindingVersion": AMQP_BINDING_VERSION,
        }
    }


def _queue_binding(broker: _Broker, name: str) -> dict[str, Any]:
    return {
        "amqp": {
            "is": "queue",
            "queue": {
                "name": name,
                "durable": True,
                "exclusive": False,
                "autoDelete": False,
                "vhost": broker.vhost,
            },
            "bindingVersion": AMQP_BINDING_VERSION,
        }
    }


def _event_message(event_type: EventType) -> dict[str, Any]:
    transition = "" if event_type is EventType.CREATED else " `data.previous_status` is set."
    return {
        "name": event_type.value,
        "title": f"Order event {event_type.value}",
        "summary": f"An order changed; routing key and CloudEvents `type` `{event_type.value}`.",
        "description": (
            "A CloudEvents 1.0 structured-mode envelope; `data` is the order after the change."
            + transition
            + " Persistent, `message_id` = `id`, `correlation_id` = the request id."
            " Delivered at least once: a redelivery keeps its `id`."
        ),
        "contentType": CONTENT_TYPE,
        "correlationId": _ref("#/components/correlationIds/requestId"),
        "payload": {
            "allOf": [
                _ref(SCHEMA_REF.format(model="OrderEvent")),
                {"type": "object", "properties": {"type": {"const": event_type.value}}},
            ]
        },
        "bindings": {
            "amqp": {"messageType": event_type.value, "bindingVersion": AMQP_BINDING_VERSION}
        },
    }


def _status_message() -> dict[str, Any]:
    return {
        "name": "status-update",
        "title": "Order status update",
        "summary": "A processor reports that an order reached a status.",
        "description": (
            "Publish to the default exchange with routing key = the status queue, JSON body,"
            " and an AMQP `message_id` (a replayed `message_id` is a no-op). `correlation_id`,"
            f" when set, becomes the event's request id. Bodies over {MAX_BODY_BYTES} bytes,"
            " bad JSON, unknown orders and moves the state machine refuses are dead-lettered."
        ),
        "contentType": "application/json",
        "payload": _ref(SCHEMA_REF.format(model="StatusUpdateMessage")),
        "examples": [
            {
                "name": "paid",
                "payload": {
                    "order_id": "0b6f4b5e-3f0a-4c49-9d59-0c1f6e2a7d11",
                    "status": "paid",
                    "reason": "payment captured",
                },
            }
        ],
    }


def _dead_letter_message() -> dict[str, Any]:
    return {
        "name": "dead-lettered-status-update",
        "title": "Dead-lettered status update",
        "summary": "A status message that could not apply, unchanged, with the reason.",
        "headers": {
            "type": "object",
            "required": ["x-error"],
            "properties": {
                "x-error": {
                    "type": "string",
                    "enum": [reason.value for reason in DeadLetterReason],
                },
                "x-error-detail": {"type": "string", "description": "Human-readable detail."},
            },
        },
        "payload": {"description": "The original body, byte for byte (it may not be JSON)."},
    }


def _document(broker: _Broker) -> dict[str, Any]:
    names = broker.names
    events_dlq = names.dead_letter_queue(names.queue)
    status_dlq = names.dead_letter_queue(names.status_queue)
    messages: dict[str, Any] = {_message_key(t): _event_message(t) for t in EventType}
    messages["statusUpdate"] = _status_message()
    messages["deadLetteredStatusUpdate"] = _dead_letter_message()
    event_refs = {
        _message_key(t): _ref(f"#/components/messages/{_message_key(t)}") for t in EventType
    }

    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for event_type in EventType:
        key = _message_key(event_type)
        channels[key] = {
            "address": event_type.value,
            "title": f"{event_type.value} on {names.exchange}",
            "description": f"Routing key `{event_type.value}` on the `{names.exchange}` topic "
            "exchange (durable).",
            "messages": {key: event_refs[key]},
            "bindings": _exchange_binding(broker, names.exchange, "topic"),
        }
        operations[f"send{key[0].upper()}{key[1:]}"] = {
            "action": "send",
            "title": f"Publish {event_type.value}",
            "summary": "Published from the transactional outbox with publisher confirms.",
            "channel": _ref(f"#/channels/{key}"),
            "messages": [_ref(f"#/channels/{key}/messages/{key}")],
            "bindings": {
                "amqp": {
                    "deliveryMode": 2,
                    "mandatory": True,
                    "bindingVersion": AMQP_BINDING_VERSION,
                }
            },
        }
    channels["orderEventsQueue"] = {
        "address": names.queue,
        "title": "The order events queue",
        "description": f"Durable queue bound to `order.#` on `{names.exchange}`, so no event "
        f"is dropped before a processor attaches; rejected messages go to `{events_dlq}`.",
        "messages": event_refs,
        "bindings": _queue_binding(broker, names.queue),
    }
    channels["orderEventsDeadLetters"] = {
        "address": events_dlq,
        "title": "Dead-lettered order events",
        "description": f"Events a consumer of `{names.queue}` rejected, routed through "
        f"`{names.dead_letter_exchange}` (direct) with routing key `{names.queue}`.",
        "messages": event_refs,
        "bindings": _queue_binding(broker, events_dlq),
    }
    channels["statusUpdates"] = {
        "address": names.status_queue,
        "title": "Status updates from processors",
        "messages": {"statusUpdate": _ref("#/components/messages/statusUpdate")},
        "bindings": _queue_binding(broker, names.status_queue),
    }
    channels["statusUpdateDeadLetters"] = {
        "address": status_dlq,
        "title": "Dead-lettered status updates",
        "description": f"Published to `{names.dead_letter_exchange}` with routing key "
        f"`{names.status_queue}`; the reason is in header `x-error`. Never requeued.",
        "messages": {
            "deadLetteredStatusUpdate": _ref("#/components/messages/deadLetteredStatusUpdate")
        },
        "bindings": _queue_binding(broker, status_dlq),
    }
    operations["receiveOrderEvents"] = {
        "action": "receive",
        "title": "Consume order events",
        "summary": "What downstream processors do: consume the durable events queue.",
        "channel": _ref("#/channels/orderEventsQueue"),
        "messages": [
            _ref(f"#/channels/orderEventsQueue/messages/{_message_key(t)}") for t in EventType
        ],
    }
    operations["receiveStatusUpdate"] = {
        "action": "receive",
        "title": "Apply a status update",
        "summary": "Applied through the order state machine, then acked.",
        "channel": _ref("#/channels/statusUpdates"),
        "messages": [_ref("#/channels/statusUpdates/messages/statusUpdate")],
        "bindings": {"amqp": {"ack": True, "bindingVersion": AMQP_BINDING_VERSION}},
    }
    operations["sendStatusUpdateDeadLetter"] = {
        "action": "send",
        "title": "Dead-letter a status update",
        "channel": _ref("#/channels/statusUpdateDeadLetters"),
        "messages": [_ref("#/channels/statusUpdateDeadLetters/messages/deadLetteredStatusUpdate")],
    }

    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "orders-api events",
            "version": "0.1.0",
            "description": "Every change to an order is published as a CloudEvents message; "
            "processors report status back through the status queue.",
        },
        "defaultContentType": CONTENT_TYPE,
        "servers": {
            "rabbitmq": {
                "host": f"{broker.host}:{broker.port}",
                "protocol": "amqp",
                "protocolVersion": "0.9.1",
                "description": f"RabbitMQ, virtual host `{broker.vhost}`.",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": _schemas(),
            "messages": messages,
            "correlationIds": {
                "requestId": {
                    "description": "The AMQP `correlation_id` property: the X-Request-ID of "
                    "the request (or status message) that caused the change.",
                    "location": "$message.header#/correlation_id",
                }
            },
        },
    }


@lru_cache(maxsize=8)
def _document_bytes(broker: _Broker) -> bytes:
    return dumps(_document(broker))


def asyncapi_document(settings: Settings) -> bytes:
    """The serialised document for these settings (built once per set of names)."""
    broker = _Broker(
        host=settings.RMQ_HOST,
        port=settings.RMQ_PORT,
        vhost=settings.RMQ_VHOST,
        names=TopologyNames.from_settings(settings),
    )
    return _document_bytes(broker)
