"""Order events (SPEC §8): the outbox relay, the status queue, the AsyncAPI document."""

from __future__ import annotations

import asyncio
import re
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import aio_pika
import httpx
import jsonschema_rs
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from prometheus_client import REGISTRY
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.configs import Settings
from api.database.connection import connect_raw, create_engine, create_sessionmaker
from api.events import CONTENT_TYPE, EventType
from api.helpers.enums import OrderStatus
from api.helpers.orjson_coder import dumps, loads
from api.rabbit_core.client import RabbitClient
from api.relay import OutboxRelay
from api.relay.notifications import LISTEN_APPLICATION_NAME, listen_state
from api.services.orders import transition_order
from tests.event_helpers import (
    Observer,
    insert_backlog,
    insert_order,
    insert_raw_outbox_event,
    observe_events,
    outbox_event_count,
    outbox_row_count,
    read_order,
    running_relay,
    scratch_events_environment,
    start_relay_process,
    unsent_count,
    wait_for_outbox_attempt,
)
from tests.factories import TestUser
from tests.services import rabbitmq_stopped

ORDER_FIELDS = {
    "id",
    "user_id",
    "status",
    "currency",
    "items",
    "total_amount",
    "metadata",
    "version",
    "created_at",
    "updated_at",
}


@pytest.fixture
async def amqp(settings: Settings) -> AsyncIterator[AbstractChannel]:
    """A confirm channel of the test's own, for publishing status messages and reading DLQs."""
    connection = await aio_pika.connect(settings.rabbitmq_url, timeout=10)
    async with connection:
        yield await connection.channel(publisher_confirms=True)


@pytest.fixture
async def events(app: FastAPI, settings: Settings) -> AsyncIterator[Observer]:
    """Every event the running app publishes from now on."""
    async with observe_events(settings) as observer:
        yield observer


async def move(
    sessionmaker: async_sessionmaker[AsyncSession],
    order_id: uuid.UUID,
    status: OrderStatus,
    request_id: str,
) -> None:
    async with sessionmaker() as session, session.begin():
        await transition_order(session, order_id=order_id, target=status, request_id=request_id)


async def publish_status(
    channel: AbstractChannel,
    settings: Settings,
    body: bytes | dict[str, Any],
    *,
    message_id: str | None,
    correlation_id: str | None = None,
    test_id: str | None = None,
) -> None:
    """What a processor does: publish to the default exchange, routed to the status queue."""
    message = aio_pika.Message(
        body if isinstance(body, bytes) else dumps(body),
        content_type="application/json",
        message_id=message_id,
        correlation_id=correlation_id,
        headers={"x-test-id": test_id} if test_id else None,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )
    message.message_id = message_id  # as is: the constructor would turn _TruthyEmpty into ""
    await channel.default_exchange.publish(message, routing_key=settings.RMQ_STATUS_QUEUE)


async def metric(client: httpx.AsyncClient, name: str) -> float:
    """One unlabelled sample from /metrics."""
    text = (await client.get("/metrics")).text
    found = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    assert found is not None, name
    return float(found[1])


async def status_outcomes(client: httpx.AsyncClient) -> Counter[str]:
    """`status_messages_total` by outcome, as ops see it on /metrics."""
    text = (await client.get("/metrics")).text
    found = re.findall(r'^status_messages_total\{outcome="(\w+)"\} ([0-9.e+]+)$', text, re.M)
    return Counter({outcome: int(float(value)) for outcome, value in found})


async def wait_for_outcome(
    client: httpx.AsyncClient, before: Counter[str], outcome: str, *, timeout: float = 20
) -> None:
    deadline = time.monotonic() + timeout
    while (await status_outcomes(client))[outcome] <= before[outcome]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {outcome} status message after {timeout}s")
        await asyncio.sleep(0.05)


async def dead_letter(
    channel: AbstractChannel, settings: Settings, test_id: str, *, timeout: float = 20
) -> AbstractIncomingMessage:
    """The message this test dead-lettered, read from `<status queue>.dlq`."""
    queue = await channel.declare_queue(f"{settings.RMQ_STATUS_QUEUE}.dlq", passive=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = await queue.get(no_ack=True, fail=False, timeout=5)
        if message is None:
            await asyncio.sleep(0.05)
        elif (message.headers or {}).get("x-test-id") == test_id:
            return message
    raise TimeoutError(f"no dead letter for {test_id} after {timeout}s")


def assert_event_message(
    message: AbstractIncomingMessage, *, event_type: EventType, request_id: str
) -> dict[str, Any]:
    envelope = loads(message.body)
    assert message.routing_key == event_type.value
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.content_type == CONTENT_TYPE
    assert message.message_id == envelope["id"]
    assert message.correlation_id == request_id
    assert envelope["specversion"] == "1.0"
    assert envelope["source"] == f"/v1/orders/{envelope['subject']}"
    assert envelope["type"] == event_type.value
    assert envelope["datacontenttype"] == "application/json"
    assert envelope["time"].endswith("Z")
    uuid.UUID(envelope["id"])
    return dict(envelope)


# --- the outbox relay ----------------------------------------------------------------------


async def test_every_order_change_emits_one_event_with_envelope_and_properties(
    events: Observer, sessionmaker: async_sessionmaker[AsyncSession], user: TestUser
) -> None:
    order = await insert_order(sessionmaker, user_id=user.id, request_id="req-create-1")
    for status, request_id in (
        (OrderStatus.PAID, "req-pay-1"),
        (OrderStatus.SHIPPED, "req-ship-1"),
        (OrderStatus.DELIVERED, "req-deliver-1"),
    ):
        await move(sessionmaker, order.id, status, request_id)

    await events.wait_for(lambda seen: len(seen.for_order(order.id)) >= 4)
    received = events.for_order(order.id)
    expected = [
        (EventType.CREATED, "req-create-1", None, "pending"),
        (EventType.PAID, "req-pay-1", "pending", "paid"),
        (EventType.SHIPPED, "req-ship-1", "paid", "shipped"),
        (EventType.DELIVERED, "req-deliver-1", "shipped", "delivered"),
    ]
    assert len(received) == 4
    by_type = {EventType(m.routing_key): m for m in received}
    envelopes = [
        assert_event_message(by_type[event_type], event_type=event_type, request_id=request_id)
        for event_type, request_id, _, _ in expected
    ]
    for version, (envelope, (event_type, _, previous, status)) in enumerate(
        zip(envelopes, expected, strict=True), start=1
    ):
        assert envelope["type"] == event_type.value
        assert envelope["subject"] == str(order.id)
        assert envelope["sequence"] == f"{version:020d}"
        data = envelope["data"]
        assert data["status"] == status
        assert data["version"] == version
        assert data["id"] == str(order.id)
        assert data["user_id"] == str(user.id)
        assert data["total_amount"] == 2500
        if previous is None:
            assert set(data) == ORDER_FIELDS
        else:
            assert data["previous_status"] == previous
            assert set(data) == ORDER_FIELDS | {"previous_status"}


async def test_idempotent_replay_of_an_order_emits_no_second_event(
    events: Observer,
    client: httpx.AsyncClient,
    sessionmaker: async_sessionmaker[AsyncSession],
    user: TestUser,
) -> None:
    headers = {**user.headers, "Idempotency-Key": f"events-{uuid.uuid4()}"}
    body = {"currency": "EUR", "items": [{"sku": "A-1", "quantity": 3, "unit_price": 500}]}
    first = await client.post("/v1/orders", headers=headers, json=body)
    assert first.status_code == 201, first.text
    order_id = first.json()["id"]
    await events.wait_for(lambda seen: len(seen.for_order(order_id)) == 1)
    replay = await client.post("/v1/orders", headers=headers, json=body)
    assert replay.status_code == 201
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json()["id"] == order_id
    assert await outbox_event_count(sessionmaker, uuid.UUID(order_id)) == 1
    await asyncio.sleep(0.3)  # a second event would be published within this
    [created] = events.for_order(order_id)
    assert_event_message(
        created, event_type=EventType.CREATED, request_id=first.headers["X-Request-ID"]
    )


async def test_relay_marks_published_rows_sent_and_counts_them_in_metrics(
    events: Observer,
    client: httpx.AsyncClient,
    sessionmaker: async_sessionmaker[AsyncSession],
    user: TestUser,
) -> None:
    published_before = await metric(client, "outbox_published_total")
    order = await insert_order(sessionmaker, user_id=user.id, request_id="req-sent")
    await events.wait_for(lambda seen: len(seen.for_order(order.id)) == 1)
    deadline = time.monotonic() + 10
    while await unsent_count(sessionmaker) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert await unsent_count(sessionmaker) == 0
    assert await metric(client, "outbox_published_total") >= published_before + 1
    text = (await client.get("/metrics")).text
    assert "outbox_backlog " in text
    assert "outbox_publish_failures_total " in text


async def test_two_relays_at_once_publish_each_event_once(settings: Settings) -> None:
    async with scratch_events_environment(settings) as scratch:
        engines = [create_engine(scratch) for _ in range(2)]
        rabbits = [RabbitClient(scratch) for _ in range(2)]
        try:
            for rabbit in rabbits:
                await rabbit.start()
                await rabbit.wait_connected(timeout=20)
            async with observe_events(scratch) as observer:
                expected = await insert_backlog(create_sessionmaker(engines[0]), 3000)
                small_batches = scratch.model_copy(update={"OUTBOX_BATCH_SIZE": 100})
                relays = [
                    OutboxRelay(small_batches, create_sessionmaker(engine), rabbit)
                    for engine, rabbit in zip(engines, rabbits, strict=True)
                ]
                for relay in relays:
                    await relay.start()
                try:
                    await observer.wait_for(
                        lambda seen: {m.message_id for m in seen.messages} >= expected,
                        timeout=60,
                    )
                    await asyncio.sleep(0.5)  # room for a late duplicate to show up
                finally:
                    await asyncio.gather(*(relay.stop() for relay in relays))
                ids = Counter(m.message_id for m in observer.messages)
                assert set(ids) == expected
                assert sum(ids.values()) - len(expected) <= len(expected) // 100
                assert await unsent_count(create_sessionmaker(engines[0])) == 0
        finally:
            for rabbit in rabbits:
                await rabbit.close()
            for engine in engines:
                await engine.dispose()


async def test_relay_killed_mid_batch_loses_nothing(settings: Settings) -> None:
    async with scratch_events_environment(settings) as scratch:
        engine = create_engine(scratch)
        sessionmaker = create_sessionmaker(engine)
        try:
            async with observe_events(scratch) as observer:
                expected = await insert_backlog(sessionmaker, 8000)
                first = await start_relay_process(scratch, OUTBOX_BATCH_SIZE="200")
                try:
                    await observer.wait_for(lambda seen: len(seen.messages) >= 1000, timeout=60)
                finally:
                    first.send_signal(signal.SIGKILL)
                    await first.wait()
                assert first.returncode == -signal.SIGKILL
                left = await unsent_count(sessionmaker)
                assert left > 0, "the relay finished before it was killed"

                second = await start_relay_process(scratch, OUTBOX_BATCH_SIZE="200")
                try:
                    await observer.wait_for(
                        lambda seen: {m.message_id for m in seen.messages} >= expected,
                        timeout=60,
                    )
                finally:
                    second.send_signal(signal.SIGTERM)
                    _, stderr = await asyncio.wait_for(second.communicate(), 30)
                assert second.returncode == 0, stderr.decode()[-2000:]

            first_body: dict[str, bytes] = {}
            for message in observer.messages:
                # A duplicate is the same event: same id, same bytes.
                assert first_body.setdefault(message.message_id, message.body) == message.body
            assert set(first_body) == expected
            assert await unsent_count(sessionmaker) == 0
        finally:
            await engine.dispose()


async def test_relay_publishes_a_backlog_committed_before_it_started(settings: Settings) -> None:
    async with scratch_events_environment(settings) as scratch, observe_events(scratch) as observer:
        engine = create_engine(scratch)
        try:
            expected = await insert_backlog(create_sessionmaker(engine), 50)
        finally:
            await engine.dispose()
        async with running_relay(scratch):
            await observer.wait_for(lambda seen: {m.message_id for m in seen.messages} >= expected)


async def test_relay_wakes_on_notify_and_listens_again_after_its_connection_drops(
    settings: Settings, user: TestUser
) -> None:
    # A poll interval far beyond the test's waits: only a NOTIFY can wake the relay in time.
    async with (
        scratch_events_environment(settings) as scratch,
        observe_events(scratch) as observer,
        running_relay(scratch, OUTBOX_POLL_INTERVAL=60) as (_relay, sessionmaker),
    ):
        await _wait_for_listener(scratch, present=True)
        first = await insert_backlog(sessionmaker, 1)
        await observer.wait_for(lambda seen: {m.message_id for m in seen.messages} >= first)

        # PostgreSQL drops the LISTEN connection (as in a restart); the relay listens again.
        await _terminate_listener(scratch)
        await _wait_for_listener(scratch, present=True)
        second = await insert_backlog(sessionmaker, 1)
        await observer.wait_for(
            lambda seen: {m.message_id for m in seen.messages} >= first | second, timeout=10
        )


async def test_relay_polls_and_says_so_when_no_listen_host_is_reachable(
    settings: Settings,
) -> None:
    # POSTGRES_LISTEN_HOST names a port nothing listens on: only polling can publish.
    failures_before = REGISTRY.get_sample_value("outbox_listen_failures_total") or 0.0
    async with (
        scratch_events_environment(settings) as scratch,
        observe_events(scratch) as observer,
        running_relay(scratch, POSTGRES_LISTEN_HOST=["127.0.0.1:1"], OUTBOX_POLL_INTERVAL=0.2) as (
            _relay,
            sessionmaker,
        ),
    ):
        events = await insert_backlog(sessionmaker, 5)
        await observer.wait_for(
            lambda seen: {m.message_id for m in seen.messages} >= events, timeout=10
        )
        assert await _listener_pids(scratch) == []
        assert listen_state() == "polling"  # what /ping/ready shows as relay_wakeup
    failures = REGISTRY.get_sample_value("outbox_listen_failures_total") or 0.0
    assert failures > failures_before


async def test_unroutable_event_is_a_failure_not_a_silent_confirm(settings: Settings) -> None:
    async with scratch_events_environment(settings) as scratch, observe_events(scratch) as observer:
        async with running_relay(scratch) as (_relay, sessionmaker):
            # Nothing is bound to this key: the broker returns the mandatory message.
            unroutable = await insert_raw_outbox_event(sessionmaker, routing_key="nowhere.bound")
            routable = await insert_backlog(sessionmaker, 1)
            await observer.wait_for(lambda seen: {m.message_id for m in seen.messages} >= routable)
            row = await wait_for_outbox_attempt(sessionmaker, unroutable)
        assert row["sent_at"] is None
        assert row["attempts"] >= 1
        assert "PublishError" in row["last_error"]
        assert str(unroutable) not in {m.message_id for m in observer.messages}


async def test_sent_rows_are_deleted_after_the_retention_period(settings: Settings) -> None:
    async with scratch_events_environment(settings) as scratch, observe_events(scratch) as observer:
        async with running_relay(scratch) as (_relay, sessionmaker):
            expected = await insert_backlog(sessionmaker, 20)
            await observer.wait_for(lambda seen: {m.message_id for m in seen.messages} >= expected)
            assert await outbox_row_count(sessionmaker) == 20  # kept for OUTBOX_RETENTION_HOURS
        async with running_relay(scratch, OUTBOX_RETENTION_HOURS=0) as (_relay, sessionmaker):
            deadline = time.monotonic() + 10
            while await outbox_row_count(sessionmaker) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert await outbox_row_count(sessionmaker) == 0


async def _listener_pids(settings: Settings) -> list[int]:
    connection = await connect_raw(settings, timeouts=False)
    try:
        rows = await connection.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND application_name = $2",
            settings.POSTGRES_DB,
            LISTEN_APPLICATION_NAME,
        )
        return [row["pid"] for row in rows]
    finally:
        await connection.close()


async def _wait_for_listener(settings: Settings, *, present: bool, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while bool(await _listener_pids(settings)) is not present:
        if time.monotonic() > deadline:
            raise TimeoutError(f"LISTEN connection still {'absent' if present else 'there'}")
        await asyncio.sleep(0.1)


async def _terminate_listener(settings: Settings) -> None:
    pids = await _listener_pids(settings)
    assert pids
    connection = await connect_raw(settings, timeouts=False)
    try:
        for pid in pids:
            await connection.execute("SELECT pg_terminate_backend($1)", pid)
    finally:
        await connection.close()
    await _wait_for_listener(settings, present=False, timeout=10)


# --- the status queue ----------------------------------------------------------------------


async def test_status_update_applies_the_transition_and_emits_the_event(
    events: Observer,
    amqp: AbstractChannel,
    settings: Settings,
    sessionmaker: async_sessionmaker[AsyncSession],
    user: TestUser,
) -> None:
    order = await insert_order(sessionmaker, user_id=user.id)
    await publish_status(
        amqp,
        settings,
        {"order_id": str(order.id), "status": "paid", "reason": "payment captured"},
        message_id=str(uuid.uuid4()),
        correlation_id="proc-pay-7",
    )
    await events.wait_for(
        lambda seen: any(m.routing_key == "order.paid" for m in seen.for_order(order.id))
    )
    paid = next(m for m in events.for_order(order.id) if m.routing_key == "order.paid")
    envelope = assert_event_message(paid, event_type=EventType.PAID, request_id="proc-pay-7")
    assert envelope["data"]["previous_status"] == "pending"
    stored = await read_order(sessionmaker, order.id)
    assert stored.status is OrderStatus.PAID
    assert stored.version == 2


async def test_updates_for_one_order_apply_in_the_order_they_were_sent(
    events: Observer,
    amqp: AbstractChannel,
    settings: Settings,
    sessionmaker: async_sessionmaker[AsyncSession],
    user: TestUser,
) -> None:
    orders = [await insert_order(sessionmaker, user_id=user.id) for _ in range(5)]
    for status in ("paid", "shipped", "delivered"):
        for order in orders:
            await publish_status(
                amqp,
                settings,
                {"order_id": str(order.id), "status": status},
                message_id=str(uuid.uuid4()),
            )
    for order in orders:
        await events.wait_for(lambda seen, order=order: len(seen.for_order(order.id)) >= 4)
        stored = await read_order(sessionmaker, order.id)
        assert (stored.status, stored.version) == (OrderStatus.DELIVERED, 4)
        types = {m.routing_key for m in events.for_order(order.id)}
        assert types == {"order.created", "order.paid", "order.shipped", "order.delivered"}


async def test_replayed_message_id_is_acked_as_a_noop(
    client: httpx.AsyncClient,
    amqp: AbstractChannel,
    settings: Settings,
    sessionmaker: async_sessionmaker[AsyncSession],
    user: TestUser,
) -> None:
    order = await insert_order(sessionmaker, user_id=user.id)
    message_id = str(uuid.uuid4())
    before = await status_outcomes(client)
    await publish_status(
        amqp, settings, {"order_id": str(order.id), "status": "paid"}, message_id=message_id
    )
    await wait_for_outcome(client, before, "applied")

    before = await status_outcomes(client)
    # Same message id, another status: a redelivery must change nothing.
    await publish_status(
        amqp, settings, {"order_id": str(order.id), "status": "shipped"}, message_id=message_id
    )
    await wait_for_outcome(client, before, "noop")
    stored = await read_order(sessionmaker, order.id)
    assert (stored.status, stored.version) == (OrderStatus.PAID, 2)
    assert await outbox_event_count(sessionmaker, order.id) == 2  # created + paid, nothing new


async def test_status_the_order_already_has_is_acked_as_a_noop(
    client: httpx.AsyncClient,
    amqp: AbstractChannel,
    settings: Settings,
    sessionmaker: async_sessionmaker[AsyncSession],
    user: TestUser,
) -> None:
    order = await insert_order(sessionmaker, user_id=user.id)
    await move(sessionmaker, order.id, OrderStatus.PAID, "req-pay")
    before = await status_outcomes(client)
    await publish_status(
        amqp, settings, {"order_id": str(order.id), "status": "paid"}, message_id=str(uuid.uuid4())
    )
    await wait_for_outcome(client, before, "noop")
    stored = await read_order(sessionmaker, order.id)
    assert (stored.status, stored.version) == (OrderStatus.PAID, 2)
    assert await outbox_event_count(sessionmaker, order.id) == 2


BodyFactory = Callable[[uuid.UUID], bytes]


class _TruthyEmpty(str):
    """An empty message_id: aiormq fills in a random id when none is set, so a missing one
    cannot be sent with it; an empty one is what the service sees from such a client."""

    __slots__ = ()

    def __bool__(self) -> bool:
        return True


_EMPTY_MESSAGE_ID = _TruthyEmpty("")

DEAD_LETTER_CASES: list[tuple[str, BodyFactory, bool, str]] = [
    (
        "unknown order",
        lambda _order: dumps({"order_id": str(uuid.uuid4()), "status": "paid"}),
        True,
        "unknown-order",
    ),
    (
        "invalid transition",
        lambda order: dumps({"order_id": str(order), "status": "delivered"}),
        True,
        "invalid-transition",
    ),
    ("bad json", lambda _order: b'{"order_id": "not closed', True, "invalid-json"),
    (
        "over 64 KiB",
        lambda order: dumps({"order_id": str(order), "status": "paid", "reason": "x" * 70_000}),
        True,
        "payload-too-large",
    ),
    (
        "schema invalid",
        lambda order: dumps({"order_id": str(order), "status": "teleported"}),
        True,
        "invalid-message",
    ),
    (
        "missing message_id",
        lambda order: dumps({"order_id": str(order), "status": "paid"}),
        False,
        "missing-message-id",
    ),
]


@pytest.mark.parametrize(
    ("body_for", "with_message_id", "reason"),
    [case[1:] for case in DEAD_LETTER_CASES],
    ids=[case[0] for case in DEAD_LETTER_CASES],
)
async def test_message_that_cannot_apply_is_dead_lettered_with_the_reason(
    body_for: BodyFactory,
    with_message_id: bool,
    reason: str,
    client: httpx.AsyncClient,
    amqp: AbstractChannel,
    settings: Settings,
    sessionmaker: async_sessionmaker[AsyncSession],
    user: TestUser,
) -> None:
    order = await insert_order(sessionmaker, user_id=user.id)
    body = body_for(order.id)
    test_id = uuid.uuid4().hex
    message_id = str(uuid.uuid4()) if with_message_id else _EMPTY_MESSAGE_ID
    before = await status_outcomes(client)
    await publish_status(
        amqp, settings, body, message_id=message_id, correlation_id="proc-1", test_id=test_id
    )

    dead = await dead_letter(amqp, settings, test_id)
    assert dead.headers["x-error"] == reason
    assert dead.body == body
    if with_message_id:
        assert dead.message_id == message_id
    assert dead.correlation_id == "proc-1"
    assert dead.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    await wait_for_outcome(client, before, "dead_lettered")
    stored = await read_order(sessionmaker, order.id)
    assert (stored.status, stored.version) == (OrderStatus.PENDING, 1)
    # Acked after dead-lettering: it is not in the status queue any more.
    queue = await amqp.declare_queue(settings.RMQ_STATUS_QUEUE, passive=True)
    assert queue.declaration_result.message_count == 0


async def test_consumer_stops_after_in_flight_messages_and_loses_none(
    app_factory: Callable[..., FastAPI],
    settings: Settings,
    sessionmaker: async_sessionmaker[AsyncSession],
    user: TestUser,
) -> None:
    """Shut down mid-stream: every message is either applied and acked, or back in the queue."""
    own = _own_status_queue(settings)
    # Its own status queue (so the shared app does not compete) and no relay of its own.
    app = app_factory(
        RMQ_STATUS_QUEUE=own.RMQ_STATUS_QUEUE, OUTBOX_RELAY_ENABLED=False, STATUS_PREFETCH=8
    )
    orders = [await insert_order(sessionmaker, user_id=user.id) for _ in range(60)]
    connection = await aio_pika.connect(settings.rabbitmq_url, timeout=10)
    try:
        channel = await connection.channel(publisher_confirms=True)
        async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30):
            await _wait_for_consumer(connection, own.RMQ_STATUS_QUEUE)
            for order in orders:
                await publish_status(
                    channel,
                    own,
                    {"order_id": str(order.id), "status": "paid"},
                    message_id=str(order.id),
                )
            await _wait_until_paid(sessionmaker, orders[0].id)
        # The app has shut down: whatever it did not finish is back in the queue.
        statuses = [(await read_order(sessionmaker, order.id)).status for order in orders]
        applied = statuses.count(OrderStatus.PAID)
        queue = await channel.declare_queue(own.RMQ_STATUS_QUEUE, passive=True)
        remaining = queue.declaration_result.message_count
        assert applied >= 1
        assert applied + remaining == len(orders), (applied, remaining)
    finally:
        await _delete_status_queue(connection, own)
        await connection.close()


def _own_status_queue(settings: Settings) -> Settings:
    queue = f"{settings.RMQ_STATUS_QUEUE}.{uuid.uuid4().hex[:8]}"
    return settings.model_copy(update={"RMQ_STATUS_QUEUE": queue})


async def _delete_status_queue(connection: aio_pika.abc.AbstractConnection, own: Settings) -> None:
    channel = await connection.channel()
    await channel.queue_delete(own.RMQ_STATUS_QUEUE)
    await channel.queue_delete(f"{own.RMQ_STATUS_QUEUE}.dlq")


async def _wait_until_paid(
    sessionmaker: async_sessionmaker[AsyncSession], order_id: uuid.UUID, timeout: float = 20
) -> None:
    deadline = time.monotonic() + timeout
    while (await read_order(sessionmaker, order_id)).status is not OrderStatus.PAID:
        if time.monotonic() > deadline:
            raise TimeoutError(f"order {order_id} not paid after {timeout}s")
        await asyncio.sleep(0.02)


async def _wait_for_consumer(
    connection: aio_pika.abc.AbstractConnection, name: str, timeout: float = 30
) -> None:
    """Until someone consumes queue `name` (a passive declare reports consumers)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        channel = await connection.channel()
        try:
            queue = await channel.declare_queue(name, passive=True)
            if queue.declaration_result.consumer_count >= 1:
                return
        except aio_pika.exceptions.ChannelClosed:
            pass  # not declared yet
        finally:
            if not channel.is_closed:
                await channel.close()
        await asyncio.sleep(0.1)
    raise TimeoutError(f"nobody consumes {name} after {timeout}s")


# --- RabbitMQ down -------------------------------------------------------------------------


@pytest.mark.faults
async def test_orders_taken_while_rabbitmq_is_down_are_all_published_after_it_returns(
    app: FastAPI,
    app_factory: Callable[..., FastAPI],
    client: httpx.AsyncClient,
    settings: Settings,
    sessionmaker: async_sessionmaker[AsyncSession],
    user: TestUser,
) -> None:
    own = _own_status_queue(settings)
    # A second app started while RabbitMQ is down: its consumer must attach when it returns.
    late_app = app_factory(RMQ_STATUS_QUEUE=own.RMQ_STATUS_QUEUE, OUTBOX_RELAY_ENABLED=False)
    order_ids: list[str] = []
    async with observe_events(settings, robust=True) as observer, AsyncExitStack() as stack:
        async with rabbitmq_stopped():
            late = await stack.enter_async_context(
                LifespanManager(late_app, startup_timeout=30, shutdown_timeout=60)
            )
            for index in range(200):
                response = await client.post(
                    "/v1/orders",
                    headers={**user.headers, "X-Request-ID": f"rabbit-down-{index}"},
                    json={"currency": "EUR", "items": [{"sku": "A-1", "quantity": 1,
                                                        "unit_price": 100}]},
                )  # fmt: skip
                assert response.status_code == 201, response.text
                order_ids.append(response.json()["id"])
            assert not late._state["rabbit"].is_connected

        created = set(order_ids)
        await observer.wait_for(
            lambda seen: created <= {loads(m.body)["subject"] for m in seen.messages},
            timeout=120,
        )
        first_body: dict[str, bytes] = {}
        for message in observer.messages:
            if loads(message.body)["subject"] in created:
                assert message.routing_key == "order.created"
                # Duplicates are allowed only as the same event: same id, same bytes.
                assert first_body.setdefault(message.message_id, message.body) == message.body
        assert len(first_body) == 200

        # Both consumers take messages again: the shared app's re-attached after the restart,
        # and the app that started during the outage attached once RabbitMQ came back.
        connection = await aio_pika.connect(settings.rabbitmq_url, timeout=10)
        try:
            channel = await connection.channel(publisher_confirms=True)
            for target, order_id in ((settings, order_ids[0]), (own, order_ids[1])):
                await _wait_for_consumer(connection, target.RMQ_STATUS_QUEUE)
                await publish_status(
                    channel, target, {"order_id": order_id, "status": "paid"}, message_id=order_id
                )
                await _wait_until_paid(sessionmaker, uuid.UUID(order_id))
        finally:
            await connection.close()
    # Deleted once the late app has stopped: a running consumer would declare it again.
    connection = await aio_pika.connect(settings.rabbitmq_url, timeout=10)
    try:
        await _delete_status_queue(connection, own)
    finally:
        await connection.close()


# --- AsyncAPI ------------------------------------------------------------------------------


def _resolve(document: dict[str, Any], ref: str) -> Any:
    node: Any = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


async def test_asyncapi_document_names_every_routing_key_queue_and_payload(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    response = await client.get("/asyncapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    document = response.json()
    assert document["asyncapi"] == "3.0.0"
    addresses = {channel["address"] for channel in document["channels"].values()}
    assert {event_type.value for event_type in EventType} <= addresses
    assert {
        settings.RMQ_QUEUE,
        settings.RMQ_STATUS_QUEUE,
        f"{settings.RMQ_QUEUE}.dlq",
        f"{settings.RMQ_STATUS_QUEUE}.dlq",
    } <= addresses
    for ref in _refs(document):
        assert ref.startswith("#/"), ref
        _resolve(document, ref)  # every reference resolves
    for name, operation in document["operations"].items():
        assert operation["action"] in {"send", "receive"}, name
        channel_ref = operation["channel"]["$ref"]
        for message in operation.get("messages", []):
            assert message["$ref"].startswith(channel_ref + "/messages/"), name
    schemas = document["components"]["schemas"]
    assert {"OrderEvent", "OrderEventData", "StatusUpdateMessage"} <= set(schemas)
    assert set(schemas["StatusUpdateMessage"]["required"]) == {"order_id", "status"}
    sent = {
        _resolve(document, op["channel"]["$ref"])["address"]
        for op in document["operations"].values()
        if op["action"] == "send"
    }
    assert {event_type.value for event_type in EventType} <= sent


async def test_each_order_is_its_own_source_and_every_envelope_fits_the_asyncapi_schema(
    client: httpx.AsyncClient,
    events: Observer,
    sessionmaker: async_sessionmaker[AsyncSession],
    user: TestUser,
) -> None:
    first = await insert_order(sessionmaker, user_id=user.id, request_id="req-source-1")
    second = await insert_order(sessionmaker, user_id=user.id, request_id="req-source-2")
    await move(sessionmaker, first.id, OrderStatus.PAID, "req-source-3")
    await events.wait_for(
        lambda seen: len(seen.for_order(first.id)) >= 2 and len(seen.for_order(second.id)) >= 1
    )
    document = (await client.get("/asyncapi.json")).json()
    envelope_schema = {
        "$ref": "#/components/schemas/OrderEvent",
        "components": document["components"],
    }
    validator = jsonschema_rs.Draft202012Validator(envelope_schema)
    for order, sequences in ((first, ["1", "2"]), (second, ["1"])):
        envelopes = [loads(message.body) for message in events.for_order(order.id)]
        for envelope in envelopes:
            validator.validate(envelope)
            assert envelope["source"] == f"/v1/orders/{order.id}"
        assert sorted(envelope["sequence"] for envelope in envelopes) == [
            s.zfill(20) for s in sequences
        ]
    schema = document["components"]["schemas"]["OrderEvent"]["properties"]
    assert schema["sequence"]["pattern"] == "^[0-9]{20}$"
    assert schema["source"]["pattern"].startswith("^/v1/orders/")


async def test_status_update_from_the_queue_is_never_followed_by_a_stale_cached_read(
    client: httpx.AsyncClient,
    events: Observer,
    amqp: AbstractChannel,
    settings: Settings,
    user: TestUser,
) -> None:
    created = await client.post(
        "/v1/orders",
        json={"currency": "EUR", "items": [{"sku": "A-1", "quantity": 1, "unit_price": 100}]},
        headers=user.headers,
    )
    order_id = created.json()["id"]
    url = f"/v1/orders/{order_id}"
    await client.get(url, headers=user.headers)
    assert (await client.get(url, headers=user.headers)).headers["x-cache"] == "HIT"
    await publish_status(
        amqp, settings, {"order_id": order_id, "status": "paid"}, message_id=str(uuid.uuid4())
    )
    await events.wait_for(
        lambda seen: any(m.routing_key == "order.paid" for m in seen.for_order(uuid.UUID(order_id)))
    )
    after = await client.get(url, headers=user.headers)
    assert after.json()["status"] == "paid"
    assert after.headers["x-cache"] == "MISS"
