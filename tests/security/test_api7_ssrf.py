"""API7:2023 Server Side Request Forgery: the redirect gateway reaches named services only.

It never opens a connection to a host from the request: it publishes to one RabbitMQ
routing key, the service name, and only for names in REDIRECT_SERVICES. A queue bound
to every routing key an attacker could aim at shows that nothing is ever published.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage
from fastapi import FastAPI

from api.configs import Settings
from tests.factories import TestUser
from tests.problems import assert_problem
from tests.security.helpers import fresh_app, serve

SERVICE = f"inventory-{uuid.uuid4().hex[:6]}"
# Names aimed at hosts, ports, other services or the gateway's own routes.
HOSTILE_NAMES = [
    "http://evil.example",
    "https://169.254.169.254/latest/meta-data",
    "evil.example",
    "127.0.0.1:6379",
    "127.0.0.1",
    "localhost:5432",
    "[::1]:15672",
    "../orders",
    "..",
    ".",
    "orders",
    "amq.rabbitmq.reply-to",
    f"{SERVICE}.evil",
    f"{SERVICE} ",
    f"{SERVICE}\x00",
    SERVICE.upper(),
    "%2e%2e",
    f"{SERVICE}%00",
]


def percent_encoded(name: str) -> str:
    """Every byte escaped, so no client-side normalisation (`.`, `..`, `//`) touches it."""
    return "".join(f"%{byte:02X}" for byte in name.encode())


def routing_keys(name: str) -> set[str]:
    """Every key a publish for `name` could use: the name and its first path segment."""
    return {name, name.split("/", 1)[0], percent_encoded(name)} - {SERVICE}


@contextlib.asynccontextmanager
async def watched(
    settings: Settings, keys: set[str]
) -> AsyncIterator[list[AbstractIncomingMessage]]:
    """Every message published to the RPC exchange under one of `keys`, as it arrives.

    Requests carry a TTL of REDIRECT_TIMEOUT, so they are consumed at once rather than
    read afterwards, when an expired one would be gone.
    """
    connection = await aio_pika.connect(settings.rabbitmq_url, timeout=10)
    seen: list[AbstractIncomingMessage] = []
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            settings.RMQ_RPC_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
        )
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        for key in keys:
            if 0 < len(key.encode()) <= 255:
                await queue.bind(exchange, routing_key=key)

        async def collect(message: AbstractIncomingMessage) -> None:
            seen.append(message)

        await queue.consume(collect, no_ack=True)
        yield seen


async def test_api7_ssrf_the_gateway_cannot_be_pointed_at_other_hosts_or_services(
    app_factory: Callable[..., FastAPI], settings: Settings, user: TestUser
) -> None:
    keys = {key for name in HOSTILE_NAMES for key in routing_keys(name)}
    app = fresh_app(app_factory, REDIRECT_SERVICES=SERVICE, REDIRECT_TIMEOUT=0.5)
    async with serve(app, rabbit=True) as client, watched(settings, keys) as trap:
        for name in HOSTILE_NAMES:
            for encoded in (percent_encoded(name), percent_encoded(percent_encoded(name))):
                for method in ("GET", "POST", "DELETE"):
                    response = await client.request(
                        method, f"/v1/redirect/{encoded}/x", headers=user.headers, json={}
                    )
                    assert_problem(response, 404, "not-found")
        await asyncio.sleep(0.3)  # a stray publish would have been routed by now
        assert trap == []


async def test_api7_ssrf_path_traversal_stays_inside_the_named_service(
    app_factory: Callable[..., FastAPI], settings: Settings, user: TestUser
) -> None:
    others = {"orders", "evil.example", "127.0.0.1:6379", ".."}
    app = fresh_app(app_factory, REDIRECT_SERVICES=SERVICE, REDIRECT_TIMEOUT=0.5)
    async with (
        serve(app, rabbit=True) as client,
        watched(settings, {SERVICE}) as service_queue,
        watched(settings, others) as trap,
    ):
        paths = [
            "%2e%2e/%2e%2e/v1/orders",
            "..%2F..%2Forders",
            "http:%2F%2Fevil.example%2Fx",
            "%2F%2F127.0.0.1:6379/x",
        ]
        headers = {
            **user.headers,
            "Host": "evil.example",
            "X-Forwarded-Host": "evil.example",
            "X-Forwarded-For": "127.0.0.1",
            "Cookie": "session=stolen",
        }
        for path in paths:
            # Nobody answers: the call times out, but its one message shows where it went.
            response = await client.get(f"/v1/redirect/{SERVICE}/{path}", headers=headers)
            assert_problem(response, 504, "upstream-timeout")
        await asyncio.sleep(0.3)
        forwarded = list(service_queue)
        assert trap == []

    assert len(forwarded) == len(paths)
    for message in forwarded:
        assert message.routing_key == SERVICE
        request = orjson.loads(message.body)
        assert request["path"].startswith("/")
        # The path is data for that service; the gateway has no host to resolve it against.
        assert not {"host", "authorization", "cookie", "x-forwarded-host", "x-forwarded-for"} & set(
            request["headers"]
        )
        assert set(request) == {"method", "path", "query", "headers", "body", "user", "request_id"}
