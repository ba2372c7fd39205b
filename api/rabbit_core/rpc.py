"""Request/reply over RabbitMQ with direct reply-to: one reply consumer, futures by correlation id.

RabbitMQ delivers a direct reply only to the channel that published the request
and was already consuming from `amq.rabbitmq.reply-to`, so the client owns one
channel that does both. A request that no queue is bound for comes back as a
`basic.return` before its publisher confirm, which aio-pika raises as
`PublishError` on a channel opened with `on_return_raises=True`: that is how an
unroutable call fails fast instead of waiting for its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage, FieldValue
from aio_pika.exceptions import AMQPError, DeliveryError, PublishError

from api.helpers.backoff import reconnect_forever
from api.rabbit_core.client import (
    CLOSE_TIMEOUT,
    Lifecycle,
    RabbitClient,
    RabbitUnavailable,
    until_closed,
)
from api.tracing import trace_headers


def _trace_headers() -> dict[str, FieldValue] | None:
    headers: dict[str, FieldValue] = dict(trace_headers())
    return headers or None


logger = logging.getLogger(__name__)

REPLY_TO = "amq.rabbitmq.reply-to"


class RpcError(Exception):
    """A call that got no usable answer."""


class RpcUnroutable(RpcError):
    """No queue is bound for the routing key, so nobody can answer."""


class RpcTimeout(RpcError):
    """No reply arrived in time."""


class RpcClient:
    """Publishes requests on its own channel and resolves each one with its reply."""

    def __init__(self, rabbit: RabbitClient) -> None:
        self._rabbit = rabbit
        self._state = Lifecycle.NEW
        self._task: asyncio.Task[None] | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._attached = asyncio.Event()
        self._stop = asyncio.Event()
        # Every in-flight call, removed by the call itself whatever its outcome.
        self.pending: dict[str, asyncio.Future[bytes]] = {}

    async def start(self) -> None:
        """Attach in the background once RabbitMQ is connected; never waits for the broker."""
        if self._state is not Lifecycle.NEW:
            raise RuntimeError("RpcClient.start() may be called once")
        self._state = Lifecycle.STARTED
        self._task = asyncio.create_task(self._attach_forever(), name="rabbitmq-rpc-attach")

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait up to `timeout` seconds until the reply consumer is attached."""
        try:
            await asyncio.wait_for(self._attached.wait(), timeout)
        except TimeoutError:
            raise RabbitUnavailable("RabbitMQ RPC is not ready") from None

    async def _attach_forever(self) -> None:
        await reconnect_forever(
            self._attach_session, name="rabbitmq rpc reply consumer", logger=logger, stop=self._stop
        )

    async def _attach_session(self) -> None:
        """Attach on the current connection and stay attached until its channel closes."""
        connection = await self._rabbit.wait_connected()
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        try:
            reply_queue = await channel.declare_queue(REPLY_TO, passive=True)
            # Consume before the first publish: RabbitMQ refuses reply_to without it.
            await reply_queue.consume(self._on_reply, no_ack=True)
            # The client declared it on this node; this only binds the name to our channel.
            exchange = await channel.get_exchange(self._rabbit.names.rpc_exchange, ensure=False)
        except BaseException:
            with contextlib.suppress(Exception):
                await channel.close()
            raise
        channel.close_callbacks.add(self._on_channel_closed)
        self._channel, self._exchange = channel, exchange
        self._attached.set()
        logger.info("rabbitmq rpc reply consumer attached")
        try:
            await until_closed(self._stop, channel, connection)
        finally:
            self._attached.clear()
            self._channel = self._exchange = None
            channel.close_callbacks.discard(self._on_channel_closed)
            self._on_channel_closed(channel, None)
            if not channel.is_closed:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(channel.close(), CLOSE_TIMEOUT)

    async def call(self, routing_key: str, body: bytes, *, timeout: float) -> bytes:
        """Publish `body` to `routing_key` and return the reply's body.

        Raises `RabbitUnavailable` when RabbitMQ cannot take the request,
        `RpcUnroutable` when no queue is bound for `routing_key` and `RpcTimeout`
        when no reply arrives within `timeout` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        exchange = await self._ready_exchange(deadline)
        correlation_id = uuid.uuid4().hex
        reply: asyncio.Future[bytes] = loop.create_future()
        self.pending[correlation_id] = reply
        message = aio_pika.Message(
            body,
            content_type="application/json",
            correlation_id=correlation_id,
            reply_to=REPLY_TO,
            # The request is worthless once we stop waiting; let the broker drop it.
            expiration=timeout,
            delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
            app_id="orders-api",
            # The caller's trace, for a responder that continues it (tracing on).
            headers=_trace_headers(),
        )
        try:
            remaining = max(deadline - loop.time(), 0.001)
            await self._publish(exchange, message, routing_key, timeout=remaining)
            try:
                async with asyncio.timeout_at(deadline):
                    return await reply
            except TimeoutError:
                raise RpcTimeout(f"no reply within {timeout}s") from None
        finally:
            # Also on timeout and cancellation, so a late reply finds nothing and is dropped.
            self.pending.pop(correlation_id, None)
            if reply.done() and not reply.cancelled():
                reply.exception()  # mark a connection-lost failure as seen if publish raised first

    async def _ready_exchange(self, deadline: float) -> AbstractExchange:
        """The RPC exchange on our channel, failing fast while RabbitMQ is down."""
        if self._state is Lifecycle.CLOSED:
            raise RuntimeError("RpcClient is closed")
        channel, exchange = self._channel, self._exchange
        if not self._attached.is_set() or channel is None or exchange is None or channel.is_closed:
            raise RabbitUnavailable("RabbitMQ is not connected")
        return exchange

    async def _publish(
        self,
        exchange: AbstractExchange,
        message: aio_pika.Message,
        routing_key: str,
        *,
        timeout: float,
    ) -> None:
        try:
            await exchange.publish(message, routing_key, mandatory=True, timeout=timeout)
        except PublishError:
            raise RpcUnroutable(f"no queue is bound for {routing_key!r}") from None
        except (DeliveryError, AMQPError, ConnectionError, TimeoutError) as exc:
            # A nack, a closed channel or a broker that does not confirm in time.
            raise RabbitUnavailable("RabbitMQ did not accept the request") from exc

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self.pending.get(message.correlation_id or "")
        if future is None or future.done():
            logger.debug(
                "rpc reply discarded: late or unknown",
                extra={"correlation_id": message.correlation_id},
            )
            return
        future.set_result(message.body)

    def _on_channel_closed(self, _sender: object, _exc: BaseException | None) -> None:
        # Direct replies are bound to the channel that published: once it is gone no
        # pending call can be answered, so fail them now instead of at their timeout.
        for future in list(self.pending.values()):
            if not future.done():
                future.set_exception(RabbitUnavailable("RabbitMQ connection lost"))

    async def close(self) -> None:
        """Stop attaching, fail what is still waiting and close the channel."""
        if self._state is Lifecycle.CLOSED:
            return
        self._state = Lifecycle.CLOSED
        self._stop.set()
        if self._task is not None:
            # Attached: the session fails the pending calls and closes its channel itself.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._task), CLOSE_TIMEOUT + 0.5)
            if not self._task.done():
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        for future in list(self.pending.values()):
            if not future.done():
                future.set_exception(RabbitUnavailable("RabbitMQ connection lost"))
