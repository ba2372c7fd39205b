"""Queue types and the delivery limit (SPEC §12), on the machine's RabbitMQ."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import aio_pika
import pytest

from api.configs import Settings
from api.consumers.status import StatusConsumer
from api.database.connection import connect_raw, create_engine, create_sessionmaker
from api.helpers.enums import OrderStatus
from api.helpers.orjson_coder import dumps
from api.metrics import STATUS_MESSAGES
from api.rabbit_core.client import RabbitClient
from tests.event_helpers import insert_order, read_order, scratch_events_environment
from tests.factories import make_user


def _expected_arguments(settings: Settings, queue: str) -> dict[str, Any]:
    """What SPEC §8 and §12 ask of each queue, written out by hand."""
    arguments: dict[str, Any] = {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": f"{settings.RMQ_EXCHANGE}.dlx",
        "x-dead-letter-routing-key": queue,
        "x-delivery-limit": 5,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    if queue == settings.RMQ_STATUS_QUEUE:
        arguments["x-single-active-consumer"] = True
    return arguments


async def test_queues_are_quorum_with_a_delivery_limit_and_a_single_active_status_consumer(
    settings: Settings,
) -> None:
    async with scratch_events_environment(settings) as scratch:
        rabbit = RabbitClient(scratch)
        await rabbit.start()
        try:
            await rabbit.wait_connected(timeout=30)
        finally:
            await rabbit.close()
        connection = await aio_pika.connect(scratch.rabbitmq_url, timeout=10)
        async with connection:
            # Declaring a queue again with other arguments fails, so these succeed only if
            # the service declared exactly these.
            for queue in (scratch.RMQ_QUEUE, scratch.RMQ_STATUS_QUEUE):
                channel = await connection.channel()
                await channel.declare_queue(
                    queue, durable=True, arguments=_expected_arguments(scratch, queue)
                )
                await channel.declare_queue(
                    f"{queue}.dlq", durable=True, arguments={"x-queue-type": "quorum"}
                )
            channel = await connection.channel()
            with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
                await channel.declare_queue(scratch.RMQ_QUEUE, durable=True)


async def _deliveries(outcome: str) -> float:
    return STATUS_MESSAGES.labels(outcome=outcome)._value.get()


@pytest.mark.timeout(90)
async def test_a_status_message_that_fails_every_time_is_dead_lettered_after_the_delivery_limit(
    settings: Settings,
) -> None:
    base = settings.model_copy(
        update={"RMQ_DELIVERY_LIMIT": 2, "POSTGRES_TRANSACTION_TIMEOUT": 0.5}
    )
    async with scratch_events_environment(base) as scratch:
        engine = create_engine(scratch)
        sessionmaker = create_sessionmaker(engine)
        rabbit = RabbitClient(scratch)
        await rabbit.start()
        consumer = StatusConsumer(scratch, sessionmaker, rabbit)
        user = await make_user(sessionmaker, scratch)
        order = await insert_order(sessionmaker, user_id=user.id)
        # Every attempt to apply it waits for this row lock until its statement times out.
        holder = await connect_raw(scratch, timeouts=False)
        try:
            transaction = holder.transaction()
            await transaction.start()
            await holder.execute("SELECT 1 FROM orders WHERE id = $1 FOR UPDATE", order.id)
            retried_before = await _deliveries("retried")
            await rabbit.wait_connected(timeout=30)
            await consumer.start()
            connection = await aio_pika.connect(scratch.rabbitmq_url, timeout=10)
            async with connection:
                channel = await connection.channel(publisher_confirms=True)
                message_id = str(uuid.uuid4())
                await channel.default_exchange.publish(
                    aio_pika.Message(
                        dumps({"order_id": str(order.id), "status": "paid"}),
                        message_id=message_id,
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key=scratch.RMQ_STATUS_QUEUE,
                )
                dlq = await channel.get_queue(f"{scratch.RMQ_STATUS_QUEUE}.dlq", ensure=False)
                deadline = time.monotonic() + 60
                while (dead := await dlq.get(fail=False)) is None:
                    assert time.monotonic() < deadline, "never dead-lettered"
                    await asyncio.sleep(0.2)
                await dead.ack()
                status_queue = await channel.declare_queue(scratch.RMQ_STATUS_QUEUE, passive=True)
            retried = await _deliveries("retried") - retried_before
            await transaction.rollback()
            stored = await read_order(sessionmaker, order.id)
        finally:
            await holder.close()
            await consumer.stop()
            await rabbit.close()
            await engine.dispose()

    deaths = dead.headers["x-death"]
    assert dead.message_id == message_id
    assert deaths[0]["reason"] == "delivery_limit"  # type: ignore[index,call-overload]
    # The first delivery and two redeliveries, then the broker dead-lettered it.
    assert retried == scratch.RMQ_DELIVERY_LIMIT + 1
    assert status_queue.declaration_result.message_count == 0
    assert stored.status is OrderStatus.PENDING
