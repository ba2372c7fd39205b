"""The status-queue consumer: processors report order status changes (SPEC §8).

Each message is applied through the order state machine in one transaction that
also records its `message_id`, and acked only after that commit. A redelivered
`message_id`, or a status the order already has, is acked as a no-op. A message
that can never apply is published to `<exchange>.dlx` (landing in
`<status queue>.dlq`) with the reason in header `x-error`, then acked; a
transient database failure is requeued after a short pause (and a message that
fails every time is dead-lettered by the quorum queue after RMQ_DELIVERY_LIMIT
deliveries). The queue has a single active consumer in the whole fleet, so one
order's messages are applied in the order they were published; after a failover
the consumer attaches again on the client's new connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum

import aio_pika
import orjson
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    DeliveryMode,
)
from pydantic import ValidationError
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.configs import Settings
from api.database.connection import is_database_outage
from api.database.query import orders as order_queries
from api.database.query.processed_messages import record_processed_message
from api.errors import InvalidTransition, NotFound
from api.events import StatusUpdateMessage
from api.helpers.backoff import reconnect_forever
from api.helpers.logger import request_id_var
from api.helpers.request_ids import new_request_id, valid_request_id
from api.metrics import STATUS_MESSAGES
from api.rabbit_core.client import CLOSE_TIMEOUT, RabbitClient, until_closed
from api.schemas.orders import OrderRead
from api.services.orders import transition_order
from api.tracing import consume_span

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
RETRY_DELAY = 1.0
DEAD_LETTER_TIMEOUT = 5.0
MAX_DETAIL_LENGTH = 500

# Called right after a status change commits (cache invalidation hooks in here).
OnApplied = Callable[[OrderRead], Awaitable[None]]


class Outcome(StrEnum):
    """How a message ended; also the `outcome` label of `status_messages_total`."""

    APPLIED = "applied"
    NOOP = "noop"
    DEAD_LETTERED = "dead_lettered"
    RETRIED = "retried"


class DeadLetterReason(StrEnum):
    """Values of the `x-error` header on a dead-lettered status message."""

    TOO_LARGE = "payload-too-large"
    INVALID_JSON = "invalid-json"
    INVALID_MESSAGE = "invalid-message"
    MISSING_MESSAGE_ID = "missing-message-id"
    UNKNOWN_ORDER = "unknown-order"
    INVALID_TRANSITION = "invalid-transition"
    INTERNAL_ERROR = "internal-error"


class DeadLetter(Exception):
    """The message can never apply; it goes to the dead-letter queue."""

    def __init__(self, reason: DeadLetterReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Applied:
    order: OrderRead | None  # None for a no-op


# SQLSTATEs that say "try again later": serialization failure, deadlock, a lock not
# available, a statement cancelled by its timeout (a row lock held too long).
TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "55P03", "57014"})


def _is_transient(exc: BaseException) -> bool:
    """A failure worth retrying: the database is out, or a conflict; not the message."""
    if is_database_outage(exc):
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        sqlstate = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
        return sqlstate in TRANSIENT_SQLSTATES
    return False


def parse_status_message(message: AbstractIncomingMessage) -> StatusUpdateMessage:
    """The validated payload, or DeadLetter naming what is wrong with it."""
    if len(message.body) > MAX_BODY_BYTES:
        raise DeadLetter(DeadLetterReason.TOO_LARGE, f"body over {MAX_BODY_BYTES} bytes")
    try:
        raw = orjson.loads(message.body)
    except orjson.JSONDecodeError:
        raise DeadLetter(DeadLetterReason.INVALID_JSON, "the body is not JSON") from None
    try:
        update = StatusUpdateMessage.model_validate(raw)
    except ValidationError as exc:
        fields = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in exc.errors()
        )
        raise DeadLetter(DeadLetterReason.INVALID_MESSAGE, fields) from None
    if not message.message_id:
        raise DeadLetter(DeadLetterReason.MISSING_MESSAGE_ID, "the message has no message_id")
    return update


def _request_id(message: AbstractIncomingMessage) -> str:
    """The correlation id (else the message id) when it is a valid request id; else a new one."""
    for candidate in (message.correlation_id, message.message_id):
        if candidate and valid_request_id(candidate):
            return candidate
    return new_request_id()


def dead_letter_message(
    message: AbstractIncomingMessage, reason: DeadLetterReason, detail: str
) -> aio_pika.Message:
    """The original body and properties, plus the reason; always persistent."""
    headers = dict(message.headers or {})
    headers["x-error"] = reason.value
    headers["x-error-detail"] = detail[:MAX_DETAIL_LENGTH]
    # Not copied: expiration (a dead letter should stay until someone looks at it) and
    # user_id (the broker checks it against the publishing connection's user).
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=DeliveryMode.PERSISTENT,
        priority=message.priority,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        message_id=message.message_id,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
    )


class KeyedLocks:
    """A FIFO lock per key, kept only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[uuid.UUID, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: uuid.UUID) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class StatusConsumer:
    """Consumes the status queue once RabbitMQ is up; robust channels re-attach it later."""

    def __init__(
        self,
        settings: Settings,
        sessionmaker: async_sessionmaker[AsyncSession],
        rabbit: RabbitClient,
        *,
        on_applied: OnApplied | None = None,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._rabbit = rabbit
        self._prefetch = settings.STATUS_PREFETCH
        self._status_queue_name = settings.RMQ_STATUS_QUEUE
        self._on_applied = on_applied
        self._attach_task: asyncio.Task[None] | None = None
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._dead_letters: AbstractExchange | None = None
        self._consumer_tag: str | None = None
        self._stopping = asyncio.Event()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._order_locks = KeyedLocks()

    async def start(self) -> None:
        if self._attach_task is not None:
            raise RuntimeError("StatusConsumer.start() may be called once")
        self._attach_task = asyncio.create_task(self._attach(), name="status-consumer-attach")

    async def _attach(self) -> None:
        """Consume on every connection the client gets (after a failover: on the new node)."""
        await reconnect_forever(
            self._consume_session, name="status consumer", logger=logger, stop=self._stopping
        )

    async def _consume_session(self) -> None:
        """Consume until the channel or its connection is lost, or the consumer stops."""
        connection = await self._rabbit.wait_connected()
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        try:
            await channel.set_qos(prefetch_count=self._prefetch)
            # The client declared the topology on this node before handing out the connection.
            queue = await channel.get_queue(self._status_queue_name, ensure=False)
            self._dead_letters = await channel.get_exchange(
                self._rabbit.names.dead_letter_exchange, ensure=False
            )
            self._consumer_tag = await queue.consume(self._on_message)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(channel.close(), CLOSE_TIMEOUT)
            raise
        self._channel, self._queue = channel, queue
        logger.info("status consumer attached", extra={"queue": self._status_queue_name})
        await until_closed(self._stopping, channel, connection)
        if not self._stopping.is_set():
            self._channel = self._queue = None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(channel.close(), CLOSE_TIMEOUT)

    async def _close_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(channel.close(), CLOSE_TIMEOUT)

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop taking messages, let in-flight ones finish (bounded), then close the channel."""
        self._stopping.set()
        if self._attach_task is not None and not self._attach_task.done():
            if self._channel is not None:
                # Attached: the session sees the stop and returns at once.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._attach_task), CLOSE_TIMEOUT)
            if not self._attach_task.done():
                self._attach_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._attach_task
        channel, queue = self._channel, self._queue
        attached = channel is not None and not channel.is_closed
        if attached and queue is not None and self._consumer_tag is not None:
            with contextlib.suppress(Exception):
                await queue.cancel(self._consumer_tag, timeout=CLOSE_TIMEOUT)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        if attached:
            # Unacked messages (not yet started) go back to the queue for another consumer.
            await self._close_channel()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._in_flight += 1
        self._idle.clear()
        token = request_id_var.set(_request_id(message))
        try:
            if self._stopping.is_set():
                await message.nack(requeue=True)
                return
            # The processor's trace continues here; the event the change emits carries it on.
            with consume_span(
                message.headers,
                source=self._status_queue_name,
                message_id=message.message_id,
            ):
                outcome = await self._handle(message)
            STATUS_MESSAGES.labels(outcome=outcome.value).inc()
        except Exception as exc:  # the ack/nack itself failed: the broker redelivers
            logger.warning("status message not settled", extra={"error": type(exc).__name__})
        finally:
            request_id_var.reset(token)
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _handle(self, message: AbstractIncomingMessage) -> Outcome:
        try:
            applied = await self._apply(message)
        except DeadLetter as dead:
            return await self._settle_dead_letter(message, dead)
        except Exception as exc:
            if not _is_transient(exc):
                logger.exception("status message failed unexpectedly")
                internal = DeadLetter(DeadLetterReason.INTERNAL_ERROR, type(exc).__name__)
                return await self._settle_dead_letter(message, internal)
            logger.warning("status message will be retried", extra={"error": type(exc).__name__})
            return await self._requeue(message)
        if applied.order is not None:
            await self._after_commit(applied.order)
        await message.ack()
        return Outcome.NOOP if applied.order is None else Outcome.APPLIED

    async def _settle_dead_letter(
        self, message: AbstractIncomingMessage, dead: DeadLetter
    ) -> Outcome:
        """Ack only once the dead letter is confirmed; if it cannot be, requeue the original."""
        try:
            await self._dead_letter(message, dead)
        except Exception as exc:
            logger.warning("dead-lettering failed", extra={"error": type(exc).__name__})
            return await self._requeue(message)
        await message.ack()
        return Outcome.DEAD_LETTERED

    async def _requeue(self, message: AbstractIncomingMessage) -> Outcome:
        """Back to the queue after a short pause (skipped when stopping), for a later retry."""
        if not self._stopping.is_set():
            await asyncio.sleep(RETRY_DELAY * random.uniform(0.8, 1.2))
        await message.nack(requeue=True)
        return Outcome.RETRIED

    async def _apply(self, message: AbstractIncomingMessage) -> Applied:
        """Apply the status change and record the message id in one transaction."""
        update = parse_status_message(message)
        assert message.message_id is not None
        # Messages run concurrently (up to the prefetch); one order's run in delivery order,
        # so `paid` then `shipped` sent back to back never race into an invalid transition.
        async with self._order_locks.hold(update.order_id):
            return await self._apply_in_order(message.message_id, update)

    async def _apply_in_order(self, message_id: str, update: StatusUpdateMessage) -> Applied:
        async with self._sessionmaker() as session, session.begin():
            if not await record_processed_message(session, message_id=message_id):
                return Applied(order=None)
            try:
                transition = await transition_order(
                    session,
                    order_id=update.order_id,
                    target=update.status,
                    request_id=request_id_var.get(),
                )
            except NotFound:
                raise DeadLetter(
                    DeadLetterReason.UNKNOWN_ORDER, f"no order {update.order_id}"
                ) from None
            except InvalidTransition as exc:
                current = await order_queries.get_order(
                    session, order_id=update.order_id, owner_id=None
                )
                if current is not None and current.status == update.status:
                    return Applied(order=None)  # already there: commit the id, change nothing
                raise DeadLetter(DeadLetterReason.INVALID_TRANSITION, str(exc.detail)) from None
        logger.info(
            "order status updated from the status queue",
            extra={
                "order_id": str(update.order_id),
                "status": update.status.value,
                "previous_status": transition.previous_status.value,
                "reason": update.reason,
            },
        )
        return Applied(order=transition.order)

    async def _after_commit(self, order: OrderRead) -> None:
        """The one place that runs after a status change commits (before the ack)."""
        if self._on_applied is None:
            return
        try:
            await self._on_applied(order)
        except Exception as exc:  # a hook failure must not undo or retry the applied change
            logger.warning("status hook failed", extra={"error": type(exc).__name__})

    async def _dead_letter(self, message: AbstractIncomingMessage, dead: DeadLetter) -> None:
        """Publish to the DLX with the reason and wait for the confirm (else it raises)."""
        assert self._dead_letters is not None
        await self._dead_letters.publish(
            dead_letter_message(message, dead.reason, dead.detail),
            routing_key=self._status_queue_name,
            mandatory=True,
            timeout=DEAD_LETTER_TIMEOUT,
        )
        logger.warning(
            "status message dead-lettered",
            extra={"reason": dead.reason.value, "message_id": message.message_id},
        )
