"""SIGTERM to `python -m api` (2 workers) with 100 slow requests in flight and a relay mid-drain."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator

import aio_pika
import httpx
import pytest
from aio_pika.abc import AbstractIncomingMessage
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.configs import Settings
from api.helpers.orjson_coder import dumps, loads
from tests.event_helpers import insert_backlog, observe_events, start_relay_process
from tests.factories import TestUser
from tests.faults.conftest import StartService
from tests.faults.helpers import Sample, report, scalar, timed
from tests.faults.service import GRACEFUL_TIMEOUT, WORKERS, wait_for_consumers

pytestmark = pytest.mark.faults

IN_FLIGHT = 100
REPLY_DELAY = 4.0
BACKLOG = 3000
SERVICE = "slow"


@contextlib.asynccontextmanager
async def slow_responder(settings: Settings) -> AsyncIterator[list[float]]:
    """Answers every `slow` request REPLY_DELAY s after it arrives; yields the arrival times."""
    arrivals: list[float] = []
    connection = await aio_pika.connect(settings.rabbitmq_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=IN_FLIGHT * 2)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(settings.RMQ_RPC_EXCHANGE, routing_key=SERVICE)
        replies: set[asyncio.Task[None]] = set()

        async def reply_later(message: AbstractIncomingMessage) -> None:
            await asyncio.sleep(REPLY_DELAY)
            request = loads(message.body)
            body = {"status": 200, "headers": {}, "body": {"path": request["path"]}}
            assert message.reply_to is not None
            await channel.default_exchange.publish(
                aio_pika.Message(dumps(body), correlation_id=message.correlation_id),
                routing_key=message.reply_to,
            )
            await message.ack()

        async def on_request(message: AbstractIncomingMessage) -> None:
            arrivals.append(time.monotonic())
            task = asyncio.create_task(reply_later(message))
            replies.add(task)
            task.add_done_callback(replies.discard)

        await queue.consume(on_request)
        try:
            yield arrivals
        finally:
            for task in list(replies):
                task.cancel()


@pytest.mark.timeout(150)
async def test_sigterm_finishes_100_slow_requests_stops_cleanly_and_loses_no_event(
    start_service: StartService,
    settings: Settings,
    sessionmaker: async_sessionmaker[AsyncSession],
    user: TestUser,
) -> None:
    async with (
        observe_events(settings) as observer,
        # Batches of one: the relays are still draining when the service has stopped.
        start_service(
            REDIRECT_SERVICES=SERVICE, REDIRECT_TIMEOUT=30, OUTBOX_BATCH_SIZE=1
        ) as service,
    ):
        await wait_for_consumers(settings, settings.RMQ_STATUS_QUEUE, WORKERS, 30)
        limits = httpx.Limits(max_connections=IN_FLIGHT * 2)
        async with slow_responder(settings) as arrivals, service.client(limits=limits) as client:
            calls = [
                asyncio.create_task(
                    timed(client, "GET", f"/v1/redirect/{SERVICE}/item/{n}", headers=user.headers)
                )
                for n in range(IN_FLIGHT)
            ]
            deadline = time.monotonic() + 20
            while len(arrivals) < IN_FLIGHT and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert len(arrivals) == IN_FLIGHT, "every slow call should be waiting on its reply"
            # Committed events the relays are draining when the signal comes.
            backlog = await insert_backlog(sessionmaker, BACKLOG)
            await asyncio.sleep(0.1)
            sigterm_at = time.monotonic()
            service.process.send_signal(signal.SIGTERM)
            answers: list[Sample] = await asyncio.gather(*calls)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(service.process.wait(), GRACEFUL_TIMEOUT + 5)
        exit_took = time.monotonic() - sigterm_at
        unsent_at_exit = await _unsent_of(sessionmaker, backlog)

        # A relay started afterwards publishes whatever the stopped one left.
        relay = await start_relay_process(settings)
        try:
            await observer.wait_for(
                lambda seen: backlog <= {m.message_id for m in seen.messages}, timeout=60
            )
            unsent_after = await _unsent_of(sessionmaker, backlog)
        finally:
            relay.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(relay.wait(), 15)
            finally:
                if relay.returncode is None:
                    relay.kill()
                    await relay.wait()
    log = service.log()

    assert [a.status for a in answers] == [200] * IN_FLIGHT
    assert {loads(a.body)["path"] for a in answers} == {f"/item/{n}" for n in range(IN_FLIGHT)}
    # They were in flight: every answer came after the signal.
    assert min(a.received for a in answers) > sigterm_at
    # The master exited by itself, in time and cleanly: workers, relays and consumers stopped.
    assert exit_took < GRACEFUL_TIMEOUT
    # uvicorn re-raises the signal it handled once shut down, so "ended by SIGTERM" is clean.
    assert service.process.returncode in (0, -signal.SIGTERM)
    assert '"level":"ERROR"' not in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert unsent_at_exit > 0, "the relays should have stopped mid-drain"
    assert unsent_after == 0
    assert relay.returncode in (0, -signal.SIGTERM)
    report(
        f"sigterm: {IN_FLIGHT} in-flight requests all 200 (last "
        f"{max(a.received for a in answers) - sigterm_at:.1f}s after the signal), exit after "
        f"{exit_took:.1f}s, {BACKLOG} committed events: {unsent_at_exit} unsent at exit, "
        f"all {len(backlog)} delivered after a relay restart, lost 0"
    )


async def _unsent_of(sessionmaker: async_sessionmaker[AsyncSession], event_ids: set[str]) -> int:
    sql = "SELECT count(*) FROM outbox WHERE sent_at IS NULL AND event_id::text = ANY(:ids)"
    return int(await scalar(sessionmaker, sql, ids=list(event_ids)))
