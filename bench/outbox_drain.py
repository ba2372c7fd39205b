"""Outbox drain rate: the relay against a raw aio-pika publish of the same messages.

Both publish the same 20,000 persistent order events to the same exchange and
queue with publisher confirms awaited per batch; the relay also claims each
batch (partition locks, `FOR UPDATE`) and marks it sent in PostgreSQL. Everything
runs on a throwaway database and exchange, removed at the end.

    uv run python -m bench.outbox_drain [--events 20000] [--rounds 3] [--single-lane]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from statistics import median

import aio_pika
from alembic import command
from alembic.config import Config
from sqlalchemy import delete, insert, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.configs import Settings, load_settings
from api.database.connection import create_engine, create_sessionmaker
from api.database.query.outbox import CLAIMED_COLUMNS, ClaimedEvent, count_outbox_backlog
from api.events import EventType, order_event
from api.helpers.enums import OrderStatus
from api.models import OutboxEvent
from api.rabbit_core.client import RabbitClient
from api.rabbit_core.publisher import event_message
from api.relay import OutboxRelay
from api.relay.outbox_relay import DEFAULT_LANES
from api.schemas.orders import OrderRead
from bench.environment import create_database, delete_rabbit_names, drop_database
from bench.scenarios import OUTBOX_TARGET

TARGET_RATIO = OUTBOX_TARGET


@contextlib.asynccontextmanager
async def scratch_settings(base: Settings) -> AsyncIterator[Settings]:
    """A migrated throwaway database and RabbitMQ names; dropped and deleted afterwards."""
    suffix = uuid.uuid4().hex[:8]
    prefix = f"bench.{suffix}.orders"
    settings = base.model_copy(
        update={
            "POSTGRES_DB": f"orders_bench_{suffix}",
            "RMQ_EXCHANGE": prefix,
            "RMQ_QUEUE": f"{prefix}.events",
            "RMQ_STATUS_QUEUE": f"{prefix}.status-updates",
            "RMQ_RPC_EXCHANGE": f"{prefix}.rpc",
            "LOGLEVEL": "WARNING",
        }
    )
    await create_database(settings)
    try:
        config = Config("alembic.ini")
        config.attributes["url"] = settings.postgres_url().render_as_string(hide_password=False)
        config.attributes["configure_logger"] = False
        await asyncio.to_thread(command.upgrade, config, "head")
        yield settings
    finally:
        try:
            await delete_rabbit_names(settings)
        finally:
            await drop_database(settings)


def _sample_order(index: int, now: datetime) -> OrderRead:
    quantity = 1 + index % 5
    return OrderRead(
        id=uuid.uuid4(),
        user_id=uuid.uuid4(),
        status=OrderStatus.PENDING,
        currency="EUR",
        items=[
            {
                "sku": f"SKU-{index % 97}",
                "name": "Widget",
                "quantity": quantity,
                "unit_price": 1999,
                "line_total": 1999 * quantity,
            }
        ],
        total_amount=1999 * quantity,
        metadata={"channel": "web"},
        version=1,
        created_at=now,
        updated_at=now,
    )


async def insert_backlog(sessionmaker: async_sessionmaker[AsyncSession], count: int) -> None:
    """`count` unsent order.created events, as the API would have written them."""
    now = datetime.now(UTC)
    for start in range(0, count, 2000):
        rows = []
        for index in range(start, min(start + 2000, count)):
            order = _sample_order(index, now)
            event = order_event(order, event_type=EventType.CREATED, request_id=f"bench-{index}")
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


async def _unsent(sessionmaker: async_sessionmaker[AsyncSession]) -> int:
    async with sessionmaker() as session:
        return await count_outbox_backlog(session)


async def _all_events(sessionmaker: async_sessionmaker[AsyncSession]) -> list[ClaimedEvent]:
    async with sessionmaker() as session:
        result = await session.execute(select(*CLAIMED_COLUMNS).order_by(OutboxEvent.id))
        return [ClaimedEvent(*row) for row in result]


async def raw_publish_rate(settings: Settings, events: list[ClaimedEvent], batch: int) -> float:
    """Events/s for plain aio-pika: publish a batch, then gather its confirms."""
    connection = await aio_pika.connect(settings.rabbitmq_url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(settings.RMQ_EXCHANGE, ensure=False)
        started = time.perf_counter()
        for start in range(0, len(events), batch):
            await asyncio.gather(
                *(
                    exchange.publish(event_message(event), event.routing_key)
                    for event in events[start : start + batch]
                )
            )
        return len(events) / (time.perf_counter() - started)


async def relay_drain_rate(
    settings: Settings,
    sessionmaker: async_sessionmaker[AsyncSession],
    rabbit: RabbitClient,
    *,
    lanes: int = DEFAULT_LANES,
) -> float:
    """Events/s for the relay draining the whole backlog (claim, publish, confirm, mark sent)."""
    total = await _unsent(sessionmaker)
    relay = OutboxRelay(settings, sessionmaker, rabbit, lanes=lanes)
    started = time.perf_counter()
    await relay.start()
    try:
        deadline = started + 600
        # The relay's own counter: polling PostgreSQL would load the database being measured.
        while relay.published < total:
            if time.perf_counter() > deadline:
                raise TimeoutError("the relay did not drain the backlog in 10 minutes")
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
        if await _unsent(sessionmaker):
            raise RuntimeError("the relay counted events that are not marked sent")
        return total / elapsed
    finally:
        await relay.stop()


async def _purge(settings: Settings) -> None:
    connection = await aio_pika.connect(settings.rabbitmq_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(settings.RMQ_QUEUE, ensure=True)
        await queue.purge()


async def _clear(sessionmaker: async_sessionmaker[AsyncSession], settings: Settings) -> None:
    await _purge(settings)
    async with sessionmaker() as session, session.begin():
        await session.execute(delete(OutboxEvent))


async def _relay_round(
    settings: Settings,
    sessionmaker: async_sessionmaker[AsyncSession],
    rabbit: RabbitClient,
    events: int,
    lanes: int,
) -> float:
    await insert_backlog(sessionmaker, events)
    rate = await relay_drain_rate(settings, sessionmaker, rabbit, lanes=lanes)
    await _clear(sessionmaker, settings)
    return rate


async def _raw_round(
    settings: Settings, sessionmaker: async_sessionmaker[AsyncSession], events: int
) -> float:
    await insert_backlog(sessionmaker, events)
    rate = await raw_publish_rate(
        settings, await _all_events(sessionmaker), settings.OUTBOX_BATCH_SIZE
    )
    await _clear(sessionmaker, settings)
    return rate


async def measure_outbox_drain(
    events: int = 20_000,
    rounds: int = 3,
    base: Settings | None = None,
    *,
    single_lane: bool = False,
) -> dict[str, float]:
    """Median events/s over `rounds` of raw aio-pika and of the relay, and their ratio.

    Each round runs both back to back on a fresh backlog, alternating which goes
    first, so a machine that gets busier or quieter slows both alike. With
    `single_lane`, also the relay with one batch in flight.
    """
    base = base or load_settings()
    raw: list[float] = []
    relay: list[float] = []
    one_lane: list[float] = []
    async with scratch_settings(base) as settings:
        engine = create_engine(settings)
        sessionmaker = create_sessionmaker(engine)
        rabbit = RabbitClient(settings)
        await rabbit.start()
        try:
            await rabbit.wait_connected(timeout=30)
            for round_index in range(rounds):
                relay_round = _relay_round(settings, sessionmaker, rabbit, events, DEFAULT_LANES)
                raw_round = _raw_round(settings, sessionmaker, events)
                if round_index % 2:
                    relay.append(await relay_round)
                    raw.append(await raw_round)
                else:
                    raw.append(await raw_round)
                    relay.append(await relay_round)
                if single_lane:
                    one_lane.append(
                        await _relay_round(settings, sessionmaker, rabbit, events, lanes=1)
                    )
        finally:
            await rabbit.close()
            await engine.dispose()
    result = {
        "events": float(events),
        "batch_size": float(settings.OUTBOX_BATCH_SIZE),
        "rounds": float(rounds),
        "raw_events_per_s": round(median(raw), 1),
        "relay_events_per_s": round(median(relay), 1),
        "ratio": round(median(relay) / median(raw), 3),
    }
    if one_lane:
        result["relay_single_lane_events_per_s"] = round(median(one_lane), 1)
        result["single_lane_ratio"] = round(median(one_lane) / median(raw), 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--single-lane", action="store_true", help="also measure one batch in flight"
    )
    args = parser.parse_args()
    result = asyncio.run(
        measure_outbox_drain(args.events, args.rounds, single_lane=args.single_lane)
    )
    print(
        f"outbox drain, {int(result['events'])} events, batch {int(result['batch_size'])}, "
        f"median of {int(result['rounds'])} rounds"
    )
    print(f"  raw aio-pika (confirms per batch): {result['raw_events_per_s']:>9.1f} events/s")
    print(f"  outbox relay                     : {result['relay_events_per_s']:>9.1f} events/s")
    if "relay_single_lane_events_per_s" in result:
        print(
            f"  outbox relay, one batch in flight: "
            f"{result['relay_single_lane_events_per_s']:>9.1f} events/s "
            f"({result['single_lane_ratio']:.1%})"
        )
    verdict = "ok" if result["ratio"] >= TARGET_RATIO else f"below target {TARGET_RATIO:.0%}"
    print(f"  ratio                            : {result['ratio']:>9.1%} ({verdict})")


if __name__ == "__main__":
    main()
