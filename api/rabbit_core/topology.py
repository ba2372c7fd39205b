"""The exchanges and queues of the event contract (SPEC §8), declared idempotently."""

from __future__ import annotations

from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from api.configs import Settings


@dataclass(frozen=True, slots=True)
class TopologyNames:
    exchange: str
    queue: str
    status_queue: str
    rpc_exchange: str

    @classmethod
    def from_settings(cls, settings: Settings) -> TopologyNames:
        return cls(
            exchange=settings.RMQ_EXCHANGE,
            queue=settings.RMQ_QUEUE,
            status_queue=settings.RMQ_STATUS_QUEUE,
            rpc_exchange=settings.RMQ_RPC_EXCHANGE,
        )

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


async def declare_topology(channel: AbstractChannel, names: TopologyNames) -> Topology:
    """Declare everything durable; each queue dead-letters to `<queue>.dlq` via the DLX."""
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
        dlq = await channel.declare_queue(names.dead_letter_queue(name), durable=True)
        await dlq.bind(dead_letters, routing_key=name)
        return await channel.declare_queue(
            name,
            durable=True,
            arguments={
                "x-dead-letter-exchange": names.dead_letter_exchange,
                "x-dead-letter-routing-key": name,
            },
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
