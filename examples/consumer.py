"""Read order events from the events queue and print one line per event.

    .venv/bin/python examples/consumer.py              # until Ctrl-C
    .venv/bin/python examples/consumer.py --idle 5     # stop after 5 s without an event

The smallest downstream processor: it acks each event after handling it, skips a
redelivery it has already handled (same `message_id`), and ignores an event older
than the newest one it has seen of the same order (`sequence` is the zero-padded
order version, so plain string comparison orders the events of one `source`).
Reads AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/) and RMQ_QUEUE (default
orders.events, the durable queue the service declares and binds to `order.#`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os

import aio_pika


async def consume(url: str, queue_name: str, idle: float | None) -> int:
    """Print events until `idle` seconds pass without one; the number printed."""
    seen_ids: set[str] = set()  # use a table with a unique key in real code
    newest: dict[str, str] = {}  # source -> highest sequence handled
    printed = 0
    connection = await aio_pika.connect_robust(url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=50)
        queue = await channel.get_queue(queue_name)  # declared by the service
        async with queue.iterator() as messages:
            while True:
                try:
                    message = await asyncio.wait_for(messages.__anext__(), idle)
                except TimeoutError:
                    return printed
                # Ack on success; an exception puts the message back on the queue.
                async with message.process(requeue=True):
                    if message.message_id in seen_ids:
                        continue  # a redelivery: same id, already handled
                    event = json.loads(message.body)
                    source, sequence = event["source"], event["sequence"]
                    if sequence <= newest.get(source, ""):
                        continue  # older than a state already handled
                    order = event["data"]
                    print(
                        f"{event['type']:<16} {event['subject']} sequence {sequence}"
                        f" status {order['status']} total {order['total_amount']}"
                        f" {order['currency']} request {message.correlation_id}",
                        flush=True,
                    )
                    newest[source] = sequence
                    seen_ids.add(str(message.message_id))
                    printed += 1


def main() -> None:
    parser = argparse.ArgumentParser(description="Print order events as they arrive.")
    parser.add_argument("--idle", type=float, help="stop after this many seconds without one")
    args = parser.parse_args()
    url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    queue = os.environ.get("RMQ_QUEUE", "orders.events")
    try:
        count = asyncio.run(consume(url, queue, args.idle))
    except KeyboardInterrupt:
        return
    print(f"{count} events", flush=True)


if __name__ == "__main__":
    main()
