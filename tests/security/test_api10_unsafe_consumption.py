"""API10:2023 Unsafe Consumption of APIs: what other systems send is validated, never trusted.

Two inbound channels: status messages from order processors (RabbitMQ), and replies
from internal services behind the redirect gateway. Garbage from either is refused
in isolation, and the consumer behind it keeps working.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.configs import Settings
from api.helpers.enums import OrderStatus
from tests.event_helpers import insert_order, read_order
from tests.factories import TestUser
from tests.problems import assert_problem
from tests.security.helpers import fresh_app, serve

# Bodies a broken or hostile processor could publish, and the `x-error` each earns.
HOSTILE_STATUS_MESSAGES: dict[str, tuple[Callable[[str], bytes], str]] = {
    "truncated json": (lambda _order: b'{"order_id": "', "invalid-json"),
    "binary": (lambda _order: b"\xff\xfe\x00\x01" * 64, "invalid-json"),
    "nested 100k deep": (lambda _order: b"[" * 100_000 + b"]" * 100_000, "payload-too-large"),
    "over 64 KiB": (
        lambda order: orjson.dumps({"order_id": order, "status": "paid", "reason": "x" * 70_000}),
        "payload-too-large",
    ),
    "array": (lambda order: orjson.dumps([order, "paid"]), "invalid-message"),
    "sql in the id": (
        lambda _order: orjson.dumps({"order_id": "'; DROP TABLE orders; --", "status": "paid"}),
        "invalid-message",
    ),
    "unknown status": (
        lambda order: orjson.dumps({"order_id": order, "status": "refunded"}),
        "invalid-message",
    ),
    "unknown order": (
        lambda _order: orjson.dumps({"order_id": str(uuid.uuid4()), "status": "paid"}),
        "unknown-order",
    ),
    "skipping states": (
        lambda order: orjson.dumps({"order_id": order, "status": "delivered"}),
        "invalid-transition",
    ),
}


@contextlib.asynccontextmanager
async def amqp_channel(settings: Settings) -> AsyncIterator[AbstractChannel]:
    connection = await aio_pika.connect(settings.rabbitmq_url, timeout=10)
    async with connection:
        yield await connection.channel(publisher_confirms=True)


async def wait_for_consumer(channel: AbstractChannel, queue: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        declared = await channel.declare_queue(queue, passive=True)
        if declared.declaration_result.consumer_count >= 1:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"nobody consumes {queue} after {timeout}s")


async def publish(channel: AbstractChannel, settings: Settings, body: bytes, test_id: str) -> None:
    message = aio_pika.Message(
        body,
        content_type="application/json",
        message_id=str(uuid.uuid4()),
        headers={"x-test-id": test_id},
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )
    await channel.default_exchange.publish(message, routing_key=settings.RMQ_STATUS_QUEUE)


async def dead_letters(
    channel: AbstractChannel, settings: Settings, test_ids: set[str], timeout: float = 30
) -> dict[str, AbstractIncomingMessage]:
    """This test's messages from `<status queue>.dlq`, by test id (others are put back)."""
    queue = await channel.declare_queue(f"{settings.RMQ_STATUS_QUEUE}.dlq", passive=True)
    found: dict[str, AbstractIncomingMessage] = {}
    deadline = time.monotonic() + timeout
    while set(found) != test_ids and time.monotonic() < deadline:
        message = await queue.get(fail=False, timeout=5)
        if message is None:
            await asyncio.sleep(0.05)
            continue
        test_id = (message.headers or {}).get("x-test-id")
        if test_id in test_ids:
            found[str(test_id)] = message
            await message.ack()
        else:
            await message.reject(requeue=True)
    return found


async def test_api10_unsafe_consumption_hostile_status_messages_are_dead_lettered(
    app: FastAPI,
    settings: Settings,
    sessionmaker: async_sessionmaker[AsyncSession],
    user: TestUser,
) -> None:
    order = await insert_order(sessionmaker, user_id=user.id)
    run = uuid.uuid4().hex
    async with amqp_channel(settings) as channel:
        await wait_for_consumer(channel, settings.RMQ_STATUS_QUEUE)
        for name, (body_for, _reason) in HOSTILE_STATUS_MESSAGES.items():
            await publish(channel, settings, body_for(str(order.id)), f"{run}:{name}")
        # After all of that, an honest processor's update still applies.
        valid = orjson.dumps({"order_id": str(order.id), "status": "paid"})
        await publish(channel, settings, valid, f"{run}:valid")

        found = await dead_letters(
            channel, settings, {f"{run}:{name}" for name in HOSTILE_STATUS_MESSAGES}
        )
        reasons = {key.split(":", 1)[1]: m.headers["x-error"] for key, m in found.items()}
        expected = {name: reason for name, (_body, reason) in HOSTILE_STATUS_MESSAGES.items()}
        assert reasons == expected

        deadline = time.monotonic() + 20
        while (await read_order(sessionmaker, order.id)).status is not OrderStatus.PAID:
            assert time.monotonic() < deadline, "the valid update was not applied"
            await asyncio.sleep(0.05)
        stored = await read_order(sessionmaker, order.id)
        assert stored.version == 2
        # Nothing was left behind or requeued forever.
        queue = await channel.declare_queue(settings.RMQ_STATUS_QUEUE, passive=True)
        assert queue.declaration_result.message_count == 0
        assert queue.declaration_result.consumer_count >= 1


Reply = dict[str, Any] | bytes

HOSTILE_REPLIES: dict[str, Reply] = {
    "not json": b"<html>oops</html>",
    "no status": {"headers": {}, "body": "x"},
    "status 999": {"status": 999, "body": None},
    "status 101": {"status": 101, "body": None},
    "header injection": {"status": 200, "headers": {"x-a": "1\r\nSet-Cookie: sid=evil"}},
    "bad base64": {"status": 200, "body": "%%%", "body_encoding": "base64"},
    "huge integer": {"status": 200, "body": 2**80},
}


async def test_api10_unsafe_consumption_hostile_service_replies_are_502_and_the_gateway_recovers(
    app_factory: Callable[..., FastAPI], settings: Settings, user: TestUser
) -> None:
    service = f"svc-{uuid.uuid4().hex[:8]}"
    replies = [*HOSTILE_REPLIES.values(), TRUSTED_LOOKING_REPLY]

    async def answer(channel: AbstractChannel, message: AbstractIncomingMessage) -> None:
        async with message.process():
            reply = replies[int(orjson.loads(message.body)["path"].strip("/"))]
            # The stdlib encoder: orjson refuses the 80-bit integer this test needs to send.
            body = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
            await channel.default_exchange.publish(
                aio_pika.Message(body, correlation_id=message.correlation_id),
                routing_key=message.reply_to or "",
            )

    app = fresh_app(app_factory, REDIRECT_SERVICES=service, REDIRECT_TIMEOUT=3)
    async with serve(app, rabbit=True) as client, amqp_channel(settings) as channel:
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(settings.RMQ_RPC_EXCHANGE, routing_key=service)

        async def on_request(message: AbstractIncomingMessage) -> None:
            await answer(channel, message)

        await queue.consume(on_request)
        for index, name in enumerate(HOSTILE_REPLIES):
            response = await client.get(f"/v1/redirect/{service}/{index}", headers=user.headers)
            body = assert_problem(response, 502, "bad-gateway")
            assert "oops" not in body["detail"], name
            assert "evil" not in response.text, name
        trusted = await client.get(
            f"/v1/redirect/{service}/{len(HOSTILE_REPLIES)}", headers=user.headers
        )
    assert trusted.status_code == 200
    assert trusted.json() == {"ok": True}
    # The service decides its body, not the gateway's security headers.
    assert trusted.headers["x-request-id"] != "spoofed"
    assert "access-control-allow-origin" not in trusted.headers
    assert "transfer-encoding" not in trusted.headers
    assert trusted.headers["ratelimit-policy"].startswith('"default"')


# A well-formed reply that tries to set what only the gateway may set.
TRUSTED_LOOKING_REPLY: dict[str, Any] = {
    "status": 200,
    "headers": {
        "x-request-id": "spoofed",
        "access-control-allow-origin": "*",
        "ratelimit-policy": '"none";q=999999;w=1',
        "transfer-encoding": "chunked",
    },
    "body": {"ok": True},
}
