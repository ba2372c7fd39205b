"""A payment processor reporting that an order was paid, over the status queue.

    .venv/bin/python examples/status_publisher.py ORDER_ID [--status paid]

Publishes `{order_id, status, reason}` to the default exchange with routing key
RMQ_STATUS_QUEUE (default orders.status-updates). The `message_id` is derived from
the order and the status, so a retry of this script (after a timeout, a crash, a
redeploy) carries the same id and the service applies it once. Without an explicit
`message_id`, aio-pika fills in a random one for every publish, and every retry
would look new to the service. Reads AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import uuid

import aio_pika


async def publish_status(url: str, queue: str, order_id: uuid.UUID, status: str) -> str:
    """Publish one status update with publisher confirms; its message id."""
    message_id = f"payment-{order_id}-{status}"  # stable: a retry reuses it
    body = {"order_id": str(order_id), "status": status, "reason": "payment captured"}
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.default_exchange.publish(
            aio_pika.Message(
                json.dumps(body).encode(),
                content_type="application/json",
                message_id=message_id,
                correlation_id=f"payments-{uuid.uuid4()}",  # becomes the event's correlation_id
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=queue,
            mandatory=True,  # an unroutable update is an error, not a silent drop
        )
    return message_id


def main() -> None:
    parser = argparse.ArgumentParser(description="Report an order's new status.")
    parser.add_argument("order_id", type=uuid.UUID)
    parser.add_argument("--status", default="paid")
    args = parser.parse_args()
    url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    queue = os.environ.get("RMQ_STATUS_QUEUE", "orders.status-updates")
    message_id = asyncio.run(publish_status(url, queue, args.order_id, args.status))
    print(f"published {args.status} for order {args.order_id} (message_id {message_id})")


if __name__ == "__main__":
    main()
