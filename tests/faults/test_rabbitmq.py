"""RabbitMQ faults against `python -m api` (2 workers): a 10 s outage under load, three restarts."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import aio_pika
import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.configs import Settings
from api.helpers.orjson_coder import dumps, loads
from tests.event_helpers import Observer, observe_events
from tests.factories import TestUser
from tests.faults.conftest import StartService
from tests.faults.helpers import (
    ORDER_BODY,
    OpenTransactions,
    Sample,
    report,
    scalar,
    timed,
    unsent_count,
)
from tests.faults.service import WORKERS, consumer_count, wait_for_consumers
from tests.services import rabbitmq_stopped

pytestmark = pytest.mark.faults

OUTAGE = 10.0
CREATES = 200
RESUME_BOUND = 15.0
TRANSACTION_TIMEOUT = 5.0
# The relay's confirm wait (api/relay/outbox_relay.py: 0.8 x the transaction timeout).
PUBLISH_TIMEOUT = TRANSACTION_TIMEOUT * 0.8


def _subjects(observer: Observer) -> set[str]:
    return {loads(message.body)["subject"] for message in observer.messages}


def _has_events_for(order_ids: set[str]) -> Callable[[Observer], bool]:
    return lambda observer: order_ids <= _subjects(observer)


async def _create(client: httpx.AsyncClient, user: TestUser, request_id: str) -> Sample:
    headers = {**user.headers, "X-Request-ID": request_id}
    return await timed(client, "POST", "/v1/orders", json=ORDER_BODY, headers=headers)


@pytest.mark.timeout(150)
async def test_orders_taken_during_a_10s_rabbitmq_outage_are_all_delivered_after_it(
    start_service: StartService,
    settings: Settings,
    sessionmaker: async_sessionmaker[AsyncSession],
    user: TestUser,
) -> None:
    async with (
        start_service() as service,
        service.client() as client,
        observe_events(settings, robust=True) as observer,
    ):
        async with rabbitmq_stopped():
            down_at = time.monotonic()
            ready = await client.get("/ping/ready")
            tasks = []
            for index in range(CREATES):
                tasks.append(asyncio.create_task(_create(client, user, f"mq-down-{index}")))
                await asyncio.sleep(
                    max(0.0, down_at + (index + 1) * OUTAGE / CREATES - time.monotonic())
                )
            samples = await asyncio.gather(*tasks)
            assert await unsent_count(sessionmaker, user.id) == CREATES
        back_at = time.monotonic()
        created = {loads(s.body)["id"] for s in samples if s.status == 201}
        await observer.wait_for(_has_events_for(created), timeout=60)
        delivered_after = time.monotonic() - back_at

    # The outage was invisible to storefronts, and reported by readiness.
    assert [s.status for s in samples] == [201] * CREATES
    assert max(s.latency for s in samples) < 1.0
    assert ready.status_code == 200
    assert ready.json()["checks"]["rabbitmq"]["status"] == "fail"
    # Every event arrived once as itself: duplicates, if any, carry the same id and bytes.
    first_body: dict[str, bytes] = {}
    for message in observer.messages:
        if loads(message.body)["subject"] in created:
            assert message.routing_key == "order.created"
            assert message.message_id is not None
            assert first_body.setdefault(message.message_id, message.body) == message.body
    assert len(first_body) == CREATES
    assert await unsent_count(sessionmaker, user.id) == 0
    report(
        f"rabbitmq down {back_at - down_at:.1f}s: {CREATES} orders 201, "
        f"{len(first_body)} events delivered {delivered_after:.1f}s after it returned, "
        f"lost {CREATES - len(first_body)}"
    )


async def _publish_status(settings: Settings, order_id: str, status: str) -> None:
    """What a processor does: a status message to the default exchange, routed to the queue."""
    connection = await aio_pika.connect(settings.rabbitmq_url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.default_exchange.publish(
            aio_pika.Message(
                dumps({"order_id": order_id, "status": status}),
                content_type="application/json",
                message_id=str(uuid.uuid4()),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=settings.RMQ_STATUS_QUEUE,
        )


async def _wait_for_status(
    sessionmaker: async_sessionmaker[AsyncSession], order_id: str, status: str, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    sql = "SELECT status FROM orders WHERE id = :id"
    while await scalar(sessionmaker, sql, id=order_id) != status:
        if time.monotonic() > deadline:
            raise TimeoutError(f"order {order_id} not {status} after {timeout}s")
        await asyncio.sleep(0.1)


@pytest.mark.timeout(180)
async def test_three_rabbitmq_restarts_publishing_and_the_status_consumer_resume_each_time(
    start_service: StartService,
    settings: Settings,
    sessionmaker: async_sessionmaker[AsyncSession],
    user: TestUser,
) -> None:
    resumed: list[tuple[float, float, float]] = []
    async with (
        start_service(POSTGRES_TRANSACTION_TIMEOUT=TRANSACTION_TIMEOUT) as service,
        service.client() as client,
        observe_events(settings, robust=True) as observer,
    ):
        await wait_for_consumers(settings, settings.RMQ_STATUS_QUEUE, WORKERS, 30)
        transactions = OpenTransactions(
            sessionmaker, settings.POSTGRES_DB, service.postgres_client_ports
        )
        creates: list[Sample] = []
        try:
            for restart in range(3):
                async with rabbitmq_stopped():
                    for index in range(5):  # orders keep coming in while the broker is away
                        creates.append(await _create(client, user, f"mq-restart-{restart}-{index}"))
                        await asyncio.sleep(0.2)
                back_at = time.monotonic()
                # Publishing resumes: a new order's event arrives.
                sample = await _create(client, user, f"mq-back-{restart}")
                creates.append(sample)
                order_id = loads(sample.body)["id"]
                await observer.wait_for(_has_events_for({order_id}), timeout=RESUME_BOUND)
                published = time.monotonic() - back_at
                # The status consumers of both workers take messages again.
                await _publish_status(settings, order_id, "paid")
                await _wait_for_status(sessionmaker, order_id, "paid", RESUME_BOUND)
                applied = time.monotonic() - back_at
                await wait_for_consumers(settings, settings.RMQ_STATUS_QUEUE, WORKERS, RESUME_BOUND)
                consumers = time.monotonic() - back_at
                resumed.append((published, applied, consumers))
        finally:
            await transactions.stop()
        created = {loads(s.body)["id"] for s in creates if s.status == 201}
        await observer.wait_for(_has_events_for(created), timeout=30)
        assert await consumer_count(settings, settings.RMQ_STATUS_QUEUE) >= WORKERS

    assert [s.status for s in creates] == [201] * len(creates)
    assert max(s.latency for s in creates) < 1.0
    for published, applied, consumers in resumed:
        assert max(published, applied, consumers) < RESUME_BOUND
    # A publish waits for confirms inside the relay's claim transaction: none outlived its timeout.
    assert transactions.oldest < PUBLISH_TIMEOUT + 0.5
    report(
        "rabbitmq 3 restarts: resumed (event, status applied, both consumers) after "
        + ", ".join(f"({p:.1f}s, {a:.1f}s, {c:.1f}s)" for p, a, c in resumed)
        + f"; {len(created)} orders, all events delivered; oldest open transaction "
        f"{transactions.oldest:.2f}s"
    )
