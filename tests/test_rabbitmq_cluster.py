"""The service on a three-node RabbitMQ cluster (SPEC §12): failover, quorum queues, ordering.

Every test runs against the private cluster of `tests/rabbit_cluster.py` (started once
per session, only when one of these tests runs) with a database and RabbitMQ names of
its own. Nodes are killed with SIGKILL, as a crash would, and started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.configs import Settings
from api.database.connection import create_engine, create_sessionmaker
from api.helpers.orjson_coder import dumps, loads
from api.main import create_app
from tests.event_helpers import (
    insert_backlog,
    observe_events,
    running_relay,
    scratch_events_environment,
    settings_env,
    unsent_count,
)
from tests.factories import make_user
from tests.faults.helpers import ORDER_BODY, Sample, report, timed
from tests.faults.service import running_service
from tests.rabbit_cluster import Cluster, Node

# Loopback ports for the service processes these tests start.
_PORTS = itertools.cycle(range(18401, 18500))
FAILOVER_BOUND = 5.0


def _port() -> int:
    return next(_PORTS)


def on_cluster(settings: Settings, cluster: Cluster, **overrides: Any) -> Settings:
    """`settings` pointed at every node of the cluster (RMQ_HOSTS)."""
    hosts = [node.address for node in cluster.nodes]
    return settings.model_copy(update={"RMQ_HOSTS": hosts, **overrides})


def on_node(settings: Settings, node: Node) -> Settings:
    """`settings` pointed at one node only (for observers and processors)."""
    return settings.model_copy(
        update={"RMQ_HOSTS": [], "RMQ_HOST": "127.0.0.1", "RMQ_PORT": node.port}
    )


@pytest.fixture
def cluster(rabbit_cluster: Cluster) -> Cluster:
    """The session's cluster with every node running (a node a test killed is started again)."""
    for node in rabbit_cluster.nodes:
        if not node.running:
            rabbit_cluster.restart(node)
    return rabbit_cluster


@contextlib.asynccontextmanager
async def scratch_on(
    settings: Settings, cluster: Cluster, **overrides: Any
) -> AsyncIterator[tuple[Settings, async_sessionmaker[AsyncSession]]]:
    """A database and RabbitMQ names of this test's own, on the cluster."""
    async with scratch_events_environment(on_cluster(settings, cluster, **overrides)) as scratch:
        engine = create_engine(scratch)
        try:
            yield scratch, create_sessionmaker(engine)
        finally:
            await engine.dispose()


async def _ready(client: httpx.AsyncClient, *, timeout: float = 30) -> dict[str, Any]:
    """The readiness body once RabbitMQ passes."""
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = (await client.get("/ping/ready")).json()
        if body["checks"]["rabbitmq"]["status"] == "pass" or time.monotonic() > deadline:
            return body
        await asyncio.sleep(0.2)


async def _publish_statuses(settings: Settings, updates: list[tuple[str, str]]) -> None:
    """What a processor does: status messages, in this order, on one channel with confirms."""
    connection = await aio_pika.connect(settings.rabbitmq_url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        for order_id, status in updates:
            await channel.default_exchange.publish(
                aio_pika.Message(
                    dumps({"order_id": order_id, "status": status}),
                    content_type="application/json",
                    message_id=str(uuid.uuid4()),
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=settings.RMQ_STATUS_QUEUE,
            )


async def _statuses(
    sessionmaker: async_sessionmaker[AsyncSession], ids: list[str]
) -> dict[str, str]:
    async with sessionmaker() as session:
        rows = await session.execute(
            text("SELECT id::text, status FROM orders WHERE id = ANY(CAST(:ids AS uuid[]))"),
            {"ids": ids},
        )
        return {row[0]: row[1] for row in rows}


async def _wait_statuses(
    sessionmaker: async_sessionmaker[AsyncSession], ids: list[str], status: str, timeout: float
) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        found = await _statuses(sessionmaker, ids)
        if all(found.get(order_id) == status for order_id in ids) or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.2)


async def _queue_message_ids(
    settings: Settings, queue: str, expected: set[str], timeout: float
) -> set[str]:
    """Consume `queue` (acking) until every id of `expected` was seen or `timeout` passes."""
    seen: set[str] = set()
    connection = await aio_pika.connect(settings.rabbitmq_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1000)
        declared = await channel.get_queue(queue, ensure=False)
        deadline = time.monotonic() + timeout
        async with declared.iterator() as messages:
            while not expected <= seen and time.monotonic() < deadline:
                try:
                    message = await asyncio.wait_for(messages.__anext__(), 1.0)
                except TimeoutError:
                    continue
                seen.add(message.message_id or "")
                await message.ack()
    return seen


async def _message_count(settings: Settings, queue: str) -> int:
    connection = await aio_pika.connect(settings.rabbitmq_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        count: int = declared.declaration_result.message_count
        return count


def _leader(cluster: Cluster, queue: str) -> Node:
    """The node that leads quorum queue `queue` now."""
    running = cluster.running_nodes()[0]
    for line in running.ctl(
        "list_queues", "name", "leader", "--no-table-headers", "--quiet"
    ).splitlines():
        name, _, leader = line.strip().partition("\t")
        if name == queue:
            return next(node for node in cluster.nodes if node.name == leader.strip())
    raise LookupError(f"no queue {queue}")


# --- failover ------------------------------------------------------------------------------


@pytest.mark.timeout(400)
async def test_killing_the_connected_node_under_1000_creates_moves_everything_to_another_node(
    settings: Settings, cluster: Cluster, tmp_path: Path
) -> None:
    first, second, _ = cluster.nodes
    async with scratch_on(settings, cluster) as (scratch, sessionmaker):
        user = await make_user(sessionmaker, scratch)
        async with (
            running_service(scratch, tmp_path, port=_port()) as service,
            service.client() as client,
            observe_events(on_node(scratch, second)) as observer,
        ):
            before = await _ready(client)
            assert before["checks"]["rabbitmq"]["node"] == first.address

            samples: list[Sample] = []
            created_after_kill: set[str] = set()
            killed_at: float | None = None
            # The duplicates a crash causes are the events published but not yet confirmed
            # at that instant: at most one batch per relay, and a relay's batch holds the
            # orders committed in its 10 ms coalescing window, about one per client here.
            semaphore = asyncio.Semaphore(4)

            async def create(index: int) -> None:
                nonlocal killed_at
                async with semaphore:
                    if index == 300:
                        await asyncio.to_thread(first.kill)
                        killed_at = time.monotonic()
                    sample = await timed(
                        client, "POST", "/v1/orders", json=ORDER_BODY, headers=user.headers
                    )
                samples.append(sample)
                if killed_at is not None and sample.sent > killed_at and sample.status == 201:
                    created_after_kill.add(loads(sample.body)["id"])

            async def resumed() -> float:
                """Seconds from the kill until an order created after it has its event."""
                while True:
                    if killed_at is not None and created_after_kill & {
                        loads(m.body)["subject"] for m in observer.messages[-200:]
                    }:
                        return time.monotonic() - killed_at
                    await asyncio.sleep(0.02)

            watcher = asyncio.create_task(resumed())
            await asyncio.gather(*(create(index) for index in range(1000)))
            resumed_after = await asyncio.wait_for(watcher, 30)
            created = {loads(s.body)["id"] for s in samples if s.status == 201}
            await observer.wait_for(
                lambda seen: created <= {loads(m.body)["subject"] for m in seen.messages},
                timeout=60,
            )
            after = await _ready(client)

            # The status consumer took over on another node: a processor's update applies.
            order_id = sorted(created)[0]
            await _publish_statuses(on_node(scratch, second), [(order_id, "paid")])
            applied = await _wait_statuses(sessionmaker, [order_id], "paid", 15)

    statuses = [s.status for s in samples]
    event_ids = [m.message_id for m in observer.messages if m.routing_key == "order.created"]
    duplicates = len(event_ids) - len(set(event_ids))
    assert statuses == [201] * 1000, {code: statuses.count(code) for code in set(statuses)}
    assert len(set(event_ids)) == 1000
    assert duplicates <= 10
    assert resumed_after < FAILOVER_BOUND
    assert after["checks"]["rabbitmq"]["status"] == "pass"
    assert after["checks"]["rabbitmq"]["node"] != first.address
    assert applied == {order_id: "paid"}
    report(
        f"rabbitmq node killed under 1000 creates: all 201, 1000 events, {duplicates} "
        f"duplicates, publishing again {resumed_after:.2f}s after the kill on "
        f"{after['checks']['rabbitmq']['node']}"
    )


@pytest.mark.timeout(400)
async def test_quorum_queue_keeps_every_event_through_its_leader_dying_and_a_lost_majority(
    settings: Settings, cluster: Cluster
) -> None:
    async with scratch_on(settings, cluster, POSTGRES_TRANSACTION_TIMEOUT=2.0) as (
        scratch,
        sessionmaker,
    ):
        async with running_relay(scratch, OUTBOX_BATCH_SIZE=100) as (relay, _):
            leader = _leader(cluster, scratch.RMQ_QUEUE)
            survivor = next(node for node in cluster.nodes if node is not leader)
            expected = await insert_backlog(sessionmaker, 3000)
            deadline = time.monotonic() + 60
            while relay.published < 500:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            await asyncio.to_thread(leader.kill)
            deadline = time.monotonic() + 90
            while await unsent_count(sessionmaker):
                assert time.monotonic() < deadline, "the relay did not drain after the leader died"
                await asyncio.sleep(0.2)
        queued = await _queue_message_ids(
            on_node(scratch, survivor), scratch.RMQ_QUEUE, expected, 60
        )
        lost = expected - queued
        new_leader = _leader(cluster, scratch.RMQ_QUEUE)

        # Now only one node of three: no majority for the quorum queues.
        await asyncio.to_thread(cluster.restart, leader)
        last = cluster.nodes[-1] if survivor is not cluster.nodes[-1] else cluster.nodes[0]
        stopped = [node for node in cluster.nodes if node is not last]
        for node in stopped:
            await asyncio.to_thread(node.stop)
        app = create_app(on_cluster(scratch, cluster, LOGLEVEL="WARNING"))
        async with (
            LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager,
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=manager.app), base_url="http://test"
            ) as client,
        ):
            user = await make_user(sessionmaker, scratch)
            answers = [
                await client.post("/v1/orders", json=ORDER_BODY, headers=user.headers)
                for _ in range(20)
            ]
            await asyncio.sleep(3)
            unsent_without_majority = await unsent_count(sessionmaker)
            restarting = time.monotonic()
            # The events flow as soon as the node has rejoined (before the restart returns).
            await asyncio.to_thread(cluster.restart, stopped[0])
            deadline = time.monotonic() + 60
            while await unsent_count(sessionmaker):
                assert time.monotonic() < deadline, "events did not flow once a majority was back"
                await asyncio.sleep(0.2)
            flowed_after = time.monotonic() - restarting
        order_ids = {answer.json()["id"] for answer in answers}
        bodies = await _queue_bodies(on_node(scratch, last), scratch.RMQ_QUEUE, order_ids, 30)

    assert lost == set()
    assert new_leader is not leader
    assert [answer.status_code for answer in answers] == [201] * 20
    assert unsent_without_majority == 20
    assert order_ids <= bodies
    report(
        f"quorum leader {leader.name} killed under publishing: 0 of {len(expected)} lost; "
        f"2 of 3 nodes down: 20 orders 201, all published {flowed_after:.1f}s after a node "
        "was started again (its start and rejoin included)"
    )


async def _queue_bodies(
    settings: Settings, queue: str, subjects: set[str], timeout: float
) -> set[str]:
    """Subjects of the events consumed from `queue` until all of `subjects` were seen."""
    seen: set[str] = set()
    connection = await aio_pika.connect(settings.rabbitmq_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        declared = await channel.get_queue(queue, ensure=False)
        deadline = time.monotonic() + timeout
        async with declared.iterator() as messages:
            while not subjects <= seen and time.monotonic() < deadline:
                try:
                    message = await asyncio.wait_for(messages.__anext__(), 1.0)
                except TimeoutError:
                    continue
                seen.add(loads(message.body)["subject"])
                await message.ack()
    return seen


# --- ordering across replicas --------------------------------------------------------------


@pytest.mark.timeout(400)
async def test_three_replicas_apply_each_orders_status_updates_in_order_and_emit_in_order(
    settings: Settings, cluster: Cluster, tmp_path: Path
) -> None:
    first, second, third = cluster.nodes
    async with scratch_on(settings, cluster) as (scratch, sessionmaker):
        user = await make_user(sessionmaker, scratch)
        async with (
            observe_events(on_node(scratch, third)) as observer,
            contextlib.AsyncExitStack() as stack,
        ):
            # The three replicas start together (each is stopped by the stack).
            replicas = await asyncio.gather(
                *(
                    stack.enter_async_context(running_service(scratch, tmp_path, port=_port()))
                    for _ in range(3)
                )
            )
            clients = [await stack.enter_async_context(s.client()) for s in replicas]
            semaphore = asyncio.Semaphore(16)

            async def create(index: int) -> str:
                async with semaphore:
                    response = await clients[index % 3].post(
                        "/v1/orders", json=ORDER_BODY, headers=user.headers
                    )
                assert response.status_code == 201, response.text
                return str(response.json()["id"])

            order_ids = list(await asyncio.gather(*(create(index) for index in range(300))))
            updates = [
                (order_id, status)
                for order_id in order_ids
                for status in ("paid", "shipped", "delivered")
            ]
            await _publish_statuses(on_node(scratch, second), updates)
            final = await _wait_statuses(sessionmaker, order_ids, "delivered", 120)
            await observer.wait_for(lambda seen: len(seen.messages) >= 1200, timeout=60)
            dead_lettered = await _message_count(
                on_node(scratch, first), f"{scratch.RMQ_STATUS_QUEUE}.dlq"
            )

    not_delivered = {
        order_id: status for order_id, status in final.items() if status != "delivered"
    }
    versions: dict[str, list[int]] = {}
    for body in observer.bodies():
        versions.setdefault(body["subject"], []).append(body["data"]["version"])
    out_of_order = [subject for subject, seen in versions.items() if seen != sorted(seen)]
    assert not_delivered == {}
    assert len(final) == 300
    assert dead_lettered == 0
    assert out_of_order == []
    # Duplicates may happen (at least once); every version arrived.
    assert all(set(seen) == {1, 2, 3, 4} for seen in versions.values())
    report(
        "3 replicas x 2 workers, 300 orders paid/shipped/delivered back to back: all delivered, "
        "0 dead-lettered, every order's 4 events in sequence order"
    )


# --- a queue declared otherwise ------------------------------------------------------------


@pytest.mark.timeout(300)
async def test_an_existing_classic_queue_is_one_clear_error_readiness_fail_and_no_reconnect_loop(
    settings: Settings, cluster: Cluster, tmp_path: Path
) -> None:
    first = cluster.nodes[0]
    async with scratch_on(settings, cluster) as (scratch, _):
        # A deployment from before quorum queues: the status queue exists as a classic queue.
        connection = await aio_pika.connect(scratch.rabbitmq_url, timeout=10)
        async with connection:
            channel = await connection.channel()
            await channel.declare_queue(
                scratch.RMQ_STATUS_QUEUE,
                durable=True,
                arguments={
                    "x-dead-letter-exchange": f"{scratch.RMQ_EXCHANGE}.dlx",
                    "x-dead-letter-routing-key": scratch.RMQ_STATUS_QUEUE,
                },
            )
        port = _port()
        log_path = tmp_path / "worker.log"
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "api.worker",
                env=settings_env(scratch, HOST="127.0.0.1", WORKER_PORT=str(port), LOGLEVEL="INFO"),
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )
        try:
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}", timeout=10, trust_env=False
            ) as client:
                deadline = time.monotonic() + 30
                while True:
                    with contextlib.suppress(httpx.HTTPError):
                        ready = await client.get("/readyz")
                        if "topology refused" in ready.text:
                            break
                    assert time.monotonic() < deadline, log_path.read_text()[-3000:]
                    await asyncio.sleep(0.2)
                connections_then = await asyncio.to_thread(cluster.connection_count)
                await asyncio.sleep(30)
                connections_now = await asyncio.to_thread(cluster.connection_count)
                ready_later = await client.get("/readyz")
        finally:
            if process.returncode is None:
                process.terminate()
            await asyncio.wait_for(process.wait(), 40)
    errors = [
        loads(line)
        for line in log_path.read_text().splitlines()
        if line.startswith("{") and loads(line)["level"] == "ERROR"
    ]
    rabbit = ready.json()["checks"]["rabbitmq"]
    assert ready.status_code == 503
    assert rabbit["status"] == "fail"
    assert scratch.RMQ_STATUS_QUEUE in rabbit["detail"]
    # RabbitMQ names the first argument that differs (x-queue-type, x-overflow, ...).
    assert "inequivalent arg 'x-" in rabbit["detail"]
    assert len(errors) == 1, errors
    assert scratch.RMQ_STATUS_QUEUE in str(errors[0])
    assert connections_now == connections_then
    assert ready_later.status_code == 503
    assert first.running
    report(
        f"classic status queue + RMQ_QUEUE_TYPE=quorum: 1 error line, readiness 503, "
        f"{connections_then} -> {connections_now} connections over 30 s"
    )
