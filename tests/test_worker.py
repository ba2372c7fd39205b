"""`python -m api.worker`: the relay and the status consumer as a process of their own."""

from __future__ import annotations

import asyncio
import signal
import sys
import time

import aio_pika
import httpx

from api.configs import Settings
from api.database.connection import create_engine, create_sessionmaker
from api.helpers.enums import OrderStatus
from api.helpers.orjson_coder import dumps
from tests.event_helpers import (
    insert_order,
    observe_events,
    read_order,
    scratch_events_environment,
    settings_env,
)
from tests.factories import make_user
from tests.faults.service import free_port


async def _wait_ready(client: httpx.AsyncClient, process: asyncio.subprocess.Process) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + 40
    while True:
        if process.returncode is not None:
            raise RuntimeError(f"the worker exited early with {process.returncode}")
        try:
            response = await client.get("/readyz")
            body = response.json()
            if body["status"] == "pass":
                return body  # type: ignore[no-any-return]
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("the worker did not become ready in 40 s")
        await asyncio.sleep(0.2)


async def test_worker_relays_events_applies_status_and_serves_only_ops_routes(
    settings: Settings,
) -> None:
    async with scratch_events_environment(settings) as scratch, observe_events(scratch) as observer:
        engine = create_engine(scratch)
        sessionmaker = create_sessionmaker(engine)
        port = free_port()
        env = settings_env(
            scratch,
            HOST="127.0.0.1",
            WORKER_PORT=str(port),
            REDIS_KEY_PREFIX=scratch.REDIS_KEY_PREFIX,
            LOGLEVEL="WARNING",
        )
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "api.worker",
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}", timeout=10, trust_env=False
            ) as client:
                ready = await _wait_ready(client, process)
                assert set(ready["checks"]) == {"postgres", "redis", "rabbitmq"}
                assert (await client.get("/livez")).json() == {"status": "pass"}
                # Only the ops routes: no API, no docs, no other probe aliases.
                for path in ("/v1/orders", "/docs", "/openapi.json", "/ping"):
                    assert (await client.get(path)).status_code == 404, path

                # The relay: an order committed with its event is published.
                user = await make_user(sessionmaker, scratch)
                order = await insert_order(sessionmaker, user_id=user.id)
                await observer.wait_for(lambda seen: len(seen.for_order(order.id)) == 1)
                assert observer.for_order(order.id)[0].routing_key == "order.created"

                # The status consumer: a processor's `paid` is applied and emitted.
                connection = await aio_pika.connect(scratch.rabbitmq_url, timeout=10)
                async with connection:
                    channel = await connection.channel()
                    await channel.default_exchange.publish(
                        aio_pika.Message(
                            dumps({"order_id": str(order.id), "status": "paid"}),
                            content_type="application/json",
                            message_id=f"worker-test-{order.id}",
                        ),
                        routing_key=scratch.RMQ_STATUS_QUEUE,
                    )
                await observer.wait_for(lambda seen: len(seen.for_order(order.id)) == 2)
                assert (await read_order(sessionmaker, order.id)).status is OrderStatus.PAID

                metrics = (await client.get("/metrics")).text
                assert "outbox_published_total" in metrics
                assert 'status_messages_total{outcome="applied"}' in metrics
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.wait_for(process.communicate(), 40)
            await engine.dispose()
        # uvicorn re-raises the SIGTERM it handled once it has shut down cleanly.
        assert process.returncode in (0, -signal.SIGTERM), stderr.decode()[-2000:]
        assert "Traceback" not in stderr.decode()
