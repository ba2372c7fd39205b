"""The exchanges and queues of the event contract (SPEC §8, §12), declared idempotently.

Queues are `RMQ_QUEUE_TYPE` (quorum by default: replicated, they survive the loss of
a minority of nodes). A quorum queue dead-letters a message redelivered more than
`RMQ_DELIVERY_LIMIT` times, at least once (which RabbitMQ allows only with
`x-overflow: reject-publish`). The status queue has a single active consumer, so
the fleet applies one order's status messages in the order they were published.

A queue that exists with other arguments makes RabbitMQ close the channel with
PRECONDITION_FAILED; that is a misconfiguration, raised as `TopologyMismatch`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue
from aiormq.exceptions import ChannelPreconditionFailed

from api.configs import Settings

# RabbitMQ's own text, e.g. "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for
# queue 'orders.events' in vhost '/': received ... but current is ...".
_REPLY_TEXT = re.compile(r"PRECONDITION_FAILED - (?P<text>.*?)['\"]?,?\)*$")


class TopologyMismatch(Exception):
    """A queue or exchange exists with other arguments than this service declares."""


@dataclass(frozen=True, slots=True)
class TopologyNames:
    exchange: str
    queue: str
    status_queue: str
    rpc_exchange: str
    queue_type: str = "quorum"
    delivery_limit: int = 5

    @classmethod
    def from_settings(cls, settings: Settings) -> TopologyNames:
        return cls(
            exchange=settings.RMQ_EXCHANGE,
            queue=settings.RMQ_QUEUE,
            status_queue=settings.RMQ_STATUS_QUEUE,
            rpc_exchange=settings.RMQ_RPC_EXCHANGE,
            queue_type=settings.RMQ_QUEUE_TYPE,
            delivery_limit=settings.RMQ_DELIVERY_LIMIT,
        )

    def queue_arguments(self, name: str) -> dict[str, Any]:
        """The arguments `name` is declared with (a dead-letter queue gets only its type)."""
        arguments: dict[str, Any] = {"x-queue-type": self.queue_type}
        if name in (self.queue, self.status_queue):
            arguments["x-dead-letter-exchange"] = self.dead_letter_exchange
            arguments["x-dead-letter-routing-key"] = name
            if self.queue_type == "quorum":
                arguments["x-delivery-limit"] = self.delivery_limit
                arguments["x-dead-letter-strategy"] = "at-least-once"
                arguments["x-overflow"] = "reject-publish"
        if name == self.status_queue:
            arguments["x-single-active-consumer"] = True
        return arguments

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.exchange}.dlx"

    def dead_letter_queue(self, queue: str) -> str:
        return f"{queue}.dlq"

    @property
    def queues(self) -> tuple[str, ...]:
        """Every queue `declare_topology` declares."""
        return tuple(
            name
            for queue in (self.queue, self.status_queue)
            for name in (queue, self.dead_letter_queue(queue))
        )

    @property
    def exchanges(self) -> tuple[str, ...]:
        """Every exchange `declare_topology` declares."""
        return (self.exchange, self.dead_letter_exchange, self.rpc_exchange)


@dataclass(frozen=True, slots=True)
class Topology:
    events: AbstractExchange
    dead_letters: AbstractExchange
    rpc: AbstractExchange
    events_queue: AbstractQueue
    status_queue: AbstractQueue


def describe_mismatch(error: ChannelPreconditionFailed) -> str:
    """RabbitMQ's reason without the frame's noise: it names the queue and the argument."""
    text = str(error)
    match = _REPLY_TEXT.search(text)
    return match["text"] if match else text


async def declare_topology(channel: AbstractChannel, names: TopologyNames) -> Topology:
    """Declare everything durable; each queue dead-letters to `<queue>.dlq` via the DLX.

    Raises `TopologyMismatch` when something exists with other arguments (the channel
    is closed by the broker then).
    """
    try:
        return await _declare(channel, names)
    except ChannelPreconditionFailed as exc:
        raise TopologyMismatch(describe_mismatch(exc)) from None


async def _declare(channel: AbstractChannel, names: TopologyNames) -> Topology:
    events = await channel.declare_exchange(
        names.exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    # Direct: a dead letter carries its source queue's name as routing key.
    dead_letters = await channel.declare_exchange(
        names.dead_letter_exchange, aio_pika.ExchangeType.DIRECT, durable=True
    )
    rpc = await channel.declare_exchange(
        names.rpc_exchange, aio_pika.ExchangeType.DIRECT, durable=True
    )

    async def queue_with_dlq(name: str) -> AbstractQueue:
        dlq_name = names.dead_letter_queue(name)
        dlq = await channel.declare_queue(
            dlq_name, durable=True, arguments=names.queue_arguments(dlq_name)
        )
        await dlq.bind(dead_letters, routing_key=name)
        return await channel.declare_queue(
            name, durable=True, arguments=names.queue_arguments(name)
        )

    events_queue = await queue_with_dlq(names.queue)
    await events_queue.bind(events, routing_key="order.#")
    status_queue = await queue_with_dlq(names.status_queue)
    return Topology(
        events=events,
        dead_letters=dead_letters,
        rpc=rpc,
        events_queue=events_queue,
        status_queue=status_queue,
    )
