"""Read one order's `order.created` event off the events queue, inside the compose stack.

    docker compose run --rm --no-deps -T api \\
        python -c "$(cat scripts/compose_read_event.py)" ORDER_ID [TIMEOUT_SECONDS]

Runs in the service's own image with the service's own settings (the RMQ_* variables
of the container), so it reads the queue a downstream processor would attach to. It
takes messages off RMQ_QUEUE until the event whose subject is ORDER_ID arrives, acks
that one, checks the envelope against the contract and prints it. Other messages are
left unacknowledged, so RabbitMQ puts them back when the connection closes. Exit 0
when the event arrived and matches, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import aio_pika

from api.configs import load_settings

CLOUDEVENTS_JSON = "application/cloudevents+json"


def problems(envelope: dict[str, Any], message: Any, order_id: str) -> list[str]:
    """What differs from the event contract (empty when the event is as promised)."""
    expected = {
        "specversion": "1.0",
        "type": "order.created",
        "subject": order_id,
        "datacontenttype": "application/json",
    }
    found = [
        f"{key}={envelope.get(key)!r}, expected {value!r}"
        for key, value in expected.items()
        if envelope.get(key) != value
    ]
    if message.content_type != CLOUDEVENTS_JSON:
        found.append(f"content_type={message.content_type!r}, expected {CLOUDEVENTS_JSON!r}")
    if message.routing_key != "order.created":
        found.append(f"routing key {message.routing_key!r}, expected 'order.created'")
    if message.message_id != envelope.get("id"):
        found.append(
            f"message_id {message.message_id!r} is not the event id {envelope.get('id')!r}"
        )
    if message.delivery_mode != aio_pika.DeliveryMode.PERSISTENT:
        found.append("the message is not persistent")
    if (envelope.get("data") or {}).get("id") != order_id:
        found.append("data.id is not the order id")
    return found


async def read_event(order_id: str, timeout: float) -> int:
    settings = load_settings()
    connection = await aio_pika.connect(settings.rabbitmq_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        # Passive: the service declared the queue; this reader changes nothing about it.
        queue = await channel.declare_queue(settings.RMQ_QUEUE, passive=True)
        deadline = time.monotonic() + timeout
        skipped = 0
        while time.monotonic() < deadline:
            message = await queue.get(no_ack=False, fail=False, timeout=5)
            if message is None:
                await asyncio.sleep(0.2)
                continue
            envelope = json.loads(message.body)
            if envelope.get("subject") != order_id:
                skipped += 1
                continue
            await message.ack()
            print(
                f"event {envelope.get('type')} id={envelope.get('id')} "
                f"subject={envelope.get('subject')} source={envelope.get('source')} "
                f"sequence={envelope.get('sequence')} "
                f"content_type={message.content_type} from queue {settings.RMQ_QUEUE!r}"
                + (f" ({skipped} other messages left on the queue)" if skipped else "")
            )
            found = problems(envelope, message, order_id)
            for problem in found:
                print(f"event does not match the contract: {problem}", file=sys.stderr)
            return 1 if found else 0
    print(
        f"no event for order {order_id} on {settings.RMQ_QUEUE!r} within {timeout:g} s",
        file=sys.stderr,
    )
    return 1


def main() -> None:
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: compose_read_event.py ORDER_ID [TIMEOUT_SECONDS]")
    timeout = float(sys.argv[2]) if len(sys.argv) == 3 else 30.0
    sys.exit(asyncio.run(read_event(sys.argv[1], timeout)))


if __name__ == "__main__":
    main()
