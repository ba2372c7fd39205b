"""Publishes outbox events with publisher confirms, a batch at a time (SPEC §8).

Each message is persistent and `mandatory`; the broker's confirms for a batch are
awaited together (one by one would be about five times slower). A message the
broker returns as unroutable, nacks, or does not confirm in time is a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    DeliveryMode,
    FieldValue,
)
from aio_pika.exceptions import DeliveryError, PublishError

from api.database.query.outbox import ClaimedEvent
from api.events import APP_ID, CONTENT_TYPE
from api.rabbit_core.client import RabbitClient
from api.tracing import publish_span, tracing_enabled

logger = logging.getLogger(__name__)


class PublishTimeout(TimeoutError):
    """The broker did not confirm a message within the publish timeout."""


def describe_failure(error: BaseException) -> str:
    """A short, body-free description of why a publish failed (for logs and `last_error`)."""
    if isinstance(error, PublishError):
        return f"PublishError: returned unroutable ({error})"
    if isinstance(error, DeliveryError):
        # Its text would embed the whole message, body included.
        return "DeliveryError: the broker nacked the message"
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def event_message(event: ClaimedEvent, trace: Mapping[str, str] | None = None) -> aio_pika.Message:
    """The AMQP message of an outbox event: the envelope as body, its ids as properties
    (and the publish span's `traceparent` header when tracing is on)."""
    headers: dict[str, FieldValue] | None = dict(trace) if trace else None
    return aio_pika.Message(
        event.body,
        headers=headers,
        content_type=CONTENT_TYPE,
        delivery_mode=DeliveryMode.PERSISTENT,
        message_id=str(event.event_id),
        correlation_id=event.correlation_id,
        type=event.routing_key,
        timestamp=event.created_at,
        app_id=APP_ID,
    )


async def _publish(exchange: AbstractExchange, event: ClaimedEvent) -> object:
    return await exchange.publish(event_message(event), event.routing_key)


async def _publish_traced(exchange: AbstractExchange, event: ClaimedEvent) -> object:
    """The publish as a span of the trace that wrote the event, its context in the headers."""
    with publish_span(
        event.trace_carrier,
        destination=exchange.name,
        routing_key=event.routing_key,
        message_id=str(event.event_id),
    ) as headers:
        return await exchange.publish(event_message(event, headers), event.routing_key)


class EventPublisher:
    """One confirm channel to the events exchange, shared by concurrent batches and
    reopened after any failure."""

    def __init__(self, rabbit: RabbitClient, *, timeout: float) -> None:
        self._rabbit = rabbit
        self._timeout = timeout
        self._channel: AbstractChannel | None = None
        # The connection the channel is on: after a failover the client has a new one.
        self._channel_connection: AbstractConnection | None = None
        self._exchange: AbstractExchange | None = None
        # Batches publish concurrently on the one channel; only one of them may open it.
        self._opening = asyncio.Lock()
        # Channels being closed in the background after a failure.
        self._closing: set[asyncio.Task[None]] = set()

    async def _ready_exchange(self) -> AbstractExchange:
        async with self._opening:
            connection = self._rabbit.connection
            if (
                self._exchange is None
                or self._channel is None
                or self._channel.is_closed
                or self._channel_connection is not connection
            ):
                self._discard_channel()
                # on_return_raises: an unroutable (returned) message fails its publish.
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                self._channel, self._channel_connection = channel, connection
                self._exchange = await channel.get_exchange(
                    self._rabbit.names.exchange, ensure=False
                )
            return self._exchange

    async def publish_batch(self, events: Sequence[ClaimedEvent]) -> list[BaseException | None]:
        """Publish `events` and await their confirms; per event, None or the failure.

        The whole batch, opening the channel included, ends within the publish timeout:
        it runs inside the relay's claim transaction, which a hung broker must not hold.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        try:
            async with asyncio.timeout_at(deadline):
                exchange = await self._ready_exchange()
        except TimeoutError:
            self._discard_channel()
            return [PublishTimeout(f"no channel within {self._timeout}s") for _ in events]
        publish = _publish_traced if tracing_enabled() else _publish
        tasks = [asyncio.ensure_future(publish(exchange, event)) for event in events]
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - loop.time()))
        for task in pending:
            task.cancel()
        outcomes: list[BaseException | None] = []
        for task in tasks:
            if task in pending:
                outcomes.append(PublishTimeout(f"no confirm within {self._timeout}s"))
            else:
                outcomes.append(task.exception())
        if pending:
            await asyncio.wait(pending)
        if any(outcome is not None for outcome in outcomes):
            # A channel that lost confirms or saw a timeout is not trusted for the next batch.
            self._discard_channel()
        return outcomes

    def _discard_channel(self) -> None:
        """Forget the channel now; close it in the background (a hung broker may never answer)."""
        channel, self._channel, self._exchange = self._channel, None, None
        self._channel_connection = None
        if channel is not None and not channel.is_closed:
            closing = asyncio.create_task(self._close_channel(channel))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    async def _close_channel(self, channel: AbstractChannel) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(channel.close(), timeout=min(self._timeout, 2.0))

    async def reset(self) -> None:
        """Drop the channel; the next batch opens a fresh one."""
        channel, self._channel, self._exchange = self._channel, None, None
        if channel is not None and not channel.is_closed:
            await self._close_channel(channel)

    async def close(self) -> None:
        await self.reset()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
