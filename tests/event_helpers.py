"""Helpers for the event tests: observe the exchange, make orders with events, scratch resources."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aio_pika
import asyncpg
from aio_pika.abc import AbstractIncomingMessage
from alembic import command
from alembic.config import Config
from sqlalchemy import func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.configs import Settings
from api.database.connection import connect_raw, create_engine, create_sessionmaker
from api.database.query import orders as order_queries
from api.database.query.outbox import insert_outbox_event
from api.events import EventType, NewOutboxEvent, order_event
from api.helpers.enums import OrderStatus
from api.helpers.orjson_coder import dumps, loads
from api.models import Order, OutboxEvent
from api.rabbit_core.client import RabbitClient
from api.rabbit_core.topology import TopologyNames
from api.relay import OutboxRelay
from api.schemas.orders import OrderRead


@dataclass
class Observer:
    """Every message a private queue bound to the events exchange received, in order."""

    messages: list[AbstractIncomingMessage] = field(default_factory=list)

    def bodies(self) -> list[dict[str, Any]]:
        return [loads(message.body) for message in self.messages]

    def for_order(self, order_id: uuid.UUID | str) -> list[AbstractIncomingMessage]:
        return [m for m in self.messages if loads(m.body)["subject"] == str(order_id)]

    async def wait_for(self, predicate: Callable[[Observer], bool], *, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"condition not met after {timeout}s ({len(self.messages)} seen)"
                )
            await asyncio.sleep(0.05)


OBSERVER_EXPIRES_MS = 600_000


@contextlib.asynccontextmanager
async def observe_events(settings: Settings, *, robust: bool = False) -> AsyncIterator[Observer]:
    """A durable private queue bound to `order.#` (survives a broker restart); deleted after."""
    connect = aio_pika.connect_robust if robust else aio_pika.connect
    connection = await connect(settings.rabbitmq_url, timeout=10)
    observer = Observer()
    name = f"{settings.RMQ_EXCHANGE}.observer.{uuid.uuid4().hex[:8]}"
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1000)
        exchange = await channel.declare_exchange(
            settings.RMQ_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        # Should the delete below fail (a broker mid-restart), the broker drops the queue
        # itself once it has had no consumer for ten minutes.
        queue = await channel.declare_queue(
            name, durable=True, arguments={"x-expires": OBSERVER_EXPIRES_MS}
        )
        await queue.bind(exchange, routing_key="order.#")

        async def collect(message: AbstractIncomingMessage) -> None:
            observer.messages.append(message)
            await message.ack()

        await queue.consume(collect)
        yield observer
    finally:
        try:
            cleanup = await connection.channel()
            await cleanup.queue_delete(name)
        except Exception:
            # The connection may be mid-reconnect (a broker restart): try a fresh one.
            with contextlib.suppress(Exception):
                fresh = await aio_pika.connect(settings.rabbitmq_url, timeout=10)
                async with fresh:
                    await (await fresh.channel()).queue_delete(name)
        finally:
            await connection.close()


async def insert_order(
    sessionmaker: async_sessionmaker[AsyncSession],
    *,
    user_id: uuid.UUID,
    request_id: str | None = None,
) -> OrderRead:
    """A pending order and its `order.created` outbox event in one transaction, as the API does."""
    async with sessionmaker() as session, session.begin():
        row = (
            await session.execute(
                insert(Order)
                .values(
                    id=uuid.uuid4(),
                    user_id=user_id,
                    currency="EUR",
                    items=[
                        {
                            "sku": "SKU-1",
                            "name": "Widget",
                            "quantity": 2,
                            "unit_price": 1250,
                            "line_total": 2500,
                        }
                    ],
                    total_amount=2500,
                    metadata_={"channel": "web"},
                )
                .returning(*order_queries.ORDER_COLUMNS)
            )
        ).one()
        order = order_queries.order_from_row(row)
        await insert_outbox_event(
            session,
            order_event(order, event_type=EventType.CREATED, request_id=request_id),
            order_id=order.id,
        )
    return order


async def read_order(
    sessionmaker: async_sessionmaker[AsyncSession], order_id: uuid.UUID
) -> OrderRead:
    async with sessionmaker() as session:
        order = await order_queries.get_order(session, order_id=order_id, owner_id=None)
    assert order is not None
    return order


async def outbox_event_count(
    sessionmaker: async_sessionmaker[AsyncSession], order_id: uuid.UUID
) -> int:
    """Outbox rows (sent or not) about one order."""
    async with sessionmaker() as session:
        result = await session.execute(
            text(
                "SELECT count(*) FROM outbox "
                "WHERE convert_from(body, 'UTF8')::jsonb ->> 'subject' = :order_id"
            ),
            {"order_id": str(order_id)},
        )
        return int(result.scalar_one())


async def insert_backlog(
    sessionmaker: async_sessionmaker[AsyncSession], count: int, *, chunk: int = 2000
) -> set[str]:
    """`count` realistic order.created outbox rows, each of its own order (no order rows
    needed: the outbox does not reference them); returns their event ids."""
    now = datetime.now(UTC)
    ids: set[str] = set()
    for start in range(0, count, chunk):
        rows = []
        for index in range(start, min(start + chunk, count)):
            order = OrderRead(
                id=uuid.uuid4(),
                user_id=uuid.uuid4(),
                status=OrderStatus.PENDING,
                currency="EUR",
                items=[
                    {
                        "sku": f"SKU-{index % 97}",
                        "name": "Widget",
                        "quantity": 1 + index % 5,
                        "unit_price": 999,
                        "line_total": 999 * (1 + index % 5),
                    }
                ],
                total_amount=999 * (1 + index % 5),
                metadata={"channel": "web"},
                version=1,
                created_at=now,
                updated_at=now,
            )
            event = order_event(order, event_type=EventType.CREATED, request_id=f"req-{index}")
            ids.add(str(event.event_id))
            rows.append(
                {
                    "event_id": event.event_id,
                    "routing_key": event.routing_key,
                    "body": event.body,
                    "correlation_id": event.correlation_id,
                    "order_id": order.id,
                }
            )
        async with sessionmaker() as session, session.begin():
            await session.execute(insert(OutboxEvent), rows)
    return ids


async def unsent_count(sessionmaker: async_sessionmaker[AsyncSession]) -> int:
    async with sessionmaker() as session:
        result = await session.execute(
            select(func.count()).select_from(OutboxEvent).where(OutboxEvent.sent_at.is_(None))
        )
        return int(result.scalar_one())


async def insert_raw_outbox_event(
    sessionmaker: async_sessionmaker[AsyncSession], *, routing_key: str
) -> uuid.UUID:
    """An outbox row with any routing key (to provoke what the API never writes)."""
    event_id = uuid.uuid4()
    async with sessionmaker() as session, session.begin():
        await insert_outbox_event(
            session,
            NewOutboxEvent(
                event_id=event_id,
                routing_key=routing_key,
                body=dumps({"id": str(event_id), "subject": "none"}),
                correlation_id="req-raw",
            ),
            order_id=None,
        )
    return event_id


async def wait_for_outbox_attempt(
    sessionmaker: async_sessionmaker[AsyncSession], event_id: uuid.UUID, *, timeout: float = 20
) -> dict[str, Any]:
    """The outbox row once a relay has recorded a failed attempt on it."""
    deadline = time.monotonic() + timeout
    while True:
        async with sessionmaker() as session:
            row = (
                await session.execute(
                    select(OutboxEvent.sent_at, OutboxEvent.attempts, OutboxEvent.last_error).where(
                        OutboxEvent.event_id == event_id
                    )
                )
            ).one()
        if row.attempts or row.sent_at or time.monotonic() > deadline:
            return dict(row._mapping)
        await asyncio.sleep(0.05)


async def outbox_row_count(sessionmaker: async_sessionmaker[AsyncSession]) -> int:
    async with sessionmaker() as session:
        result = await session.execute(select(func.count()).select_from(OutboxEvent))
        return int(result.scalar_one())


@contextlib.asynccontextmanager
async def running_relay(
    settings: Settings, **overrides: Any
) -> AsyncIterator[tuple[OutboxRelay, async_sessionmaker[AsyncSession]]]:
    """An in-process relay on its own engine and RabbitMQ connection, stopped afterwards."""
    settings = settings.model_copy(update=overrides)
    engine = create_engine(settings)
    rabbit = RabbitClient(settings)
    await rabbit.start()
    try:
        await rabbit.wait_connected(timeout=30)
        sessionmaker = create_sessionmaker(engine)
        relay = OutboxRelay(settings, sessionmaker, rabbit)
        await relay.start()
        try:
            yield relay, sessionmaker
        finally:
            await relay.stop()
    finally:
        await rabbit.close()
        await engine.dispose()


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a subprocess needs to run with exactly these settings."""
    keep = {
        k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "RMQ_", "OUTBOX_"))
    }
    return {
        **keep,
        "POSTGRES_HOST": settings.POSTGRES_HOST,
        "POSTGRES_PORT": str(settings.POSTGRES_PORT),
        "POSTGRES_HOSTS": ",".join(settings.POSTGRES_HOSTS),
        "POSTGRES_POOLER": settings.POSTGRES_POOLER.value,
        "POSTGRES_LISTEN_HOST": ",".join(settings.POSTGRES_LISTEN_HOST),
        "POSTGRES_DB": settings.POSTGRES_DB,
        "POSTGRES_USER": settings.POSTGRES_USER,
        "POSTGRES_PASSWORD": settings.POSTGRES_PASSWORD.get_secret_value(),
        "RMQ_HOST": settings.RMQ_HOST,
        "RMQ_PORT": str(settings.RMQ_PORT),
        "RMQ_USER": settings.RMQ_USER,
        "RMQ_PASSWORD": settings.RMQ_PASSWORD.get_secret_value(),
        "RMQ_VHOST": settings.RMQ_VHOST,
        "RMQ_EXCHANGE": settings.RMQ_EXCHANGE,
        "RMQ_QUEUE": settings.RMQ_QUEUE,
        "RMQ_STATUS_QUEUE": settings.RMQ_STATUS_QUEUE,
        "RMQ_RPC_EXCHANGE": settings.RMQ_RPC_EXCHANGE,
        "RMQ_HOSTS": ",".join(settings.RMQ_HOSTS),
        "RMQ_QUEUE_TYPE": settings.RMQ_QUEUE_TYPE,
        "RMQ_DELIVERY_LIMIT": str(settings.RMQ_DELIVERY_LIMIT),
        "LOGLEVEL": "WARNING",
        **extra,
    }


async def start_relay_process(settings: Settings, **extra: str) -> asyncio.subprocess.Process:
    """`python -m api.relay` with these settings, as a real separate process."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "api.relay",
        env=settings_env(settings, **extra),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


@contextlib.asynccontextmanager
async def scratch_events_environment(base: Settings) -> AsyncIterator[Settings]:
    """A migrated database and RabbitMQ names of their own, removed afterwards.

    A relay drains every outbox row of its database to its own exchange, so a test
    that runs relays with other names needs its own database as well.
    """
    suffix = uuid.uuid4().hex[:8]
    prefix = f"{base.RMQ_EXCHANGE}.{suffix}"
    settings = base.model_copy(
        update={
            "POSTGRES_DB": f"{base.POSTGRES_DB}_{suffix}",
            "RMQ_EXCHANGE": prefix,
            "RMQ_QUEUE": f"{prefix}.events",
            "RMQ_STATUS_QUEUE": f"{prefix}.status-updates",
            "RMQ_RPC_EXCHANGE": f"{prefix}.rpc",
        }
    )
    admin = await _admin_connection(settings)
    try:
        await admin.execute(f'CREATE DATABASE "{settings.POSTGRES_DB}"')
    finally:
        await admin.close()
    try:
        config = Config("alembic.ini")
        config.attributes["url"] = settings.postgres_url().render_as_string(hide_password=False)
        config.attributes["configure_logger"] = False
        await asyncio.to_thread(command.upgrade, config, "head")
        yield settings
    finally:
        await delete_rabbit_names(settings)
        admin = await _admin_connection(settings)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{settings.POSTGRES_DB}" WITH (FORCE)')
        finally:
            await admin.close()


async def _admin_connection(settings: Settings) -> asyncpg.Connection:
    # No statement timeout: creating or dropping a database takes what it takes.
    return await connect_raw(settings, database="postgres", timeouts=False)


async def delete_rabbit_names(settings: Settings) -> None:
    with contextlib.suppress(Exception):
        connection = await aio_pika.connect(settings.rabbitmq_url, timeout=5)
        async with connection:
            channel = await connection.channel()
            names = TopologyNames.from_settings(settings)
            for queue in names.queues:
                await channel.queue_delete(queue)
            for exchange in names.exchanges:
                await channel.exchange_delete(exchange)
