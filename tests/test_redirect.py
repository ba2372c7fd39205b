"""The redirect gateway (SPEC §9): HTTP in, RabbitMQ request/reply out, against a real broker.

Each test builds its own app with unique service names and starts its responder
as an aio-pika consumer on a queue bound to this run's RPC exchange.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import orjson
import pytest
from aio_pika.abc import AbstractIncomingMessage
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from api.configs import Settings
from api.rabbit_core.rpc import RpcClient
from tests.factories import TestUser
from tests.problems import assert_problem
from tests.services import rabbitmq_stopped

REPO_ROOT = Path(__file__).resolve().parent.parent

# A handler gets the decoded request and the raw message; it returns the reply as
# a dict (sent as JSON), raw bytes (sent as they are) or None (no reply at all).
Handler = Callable[
    [dict[str, Any], AbstractIncomingMessage], Awaitable[dict[str, Any] | bytes | None]
]


def service_name() -> str:
    return f"svc-{uuid.uuid4().hex[:10]}"


@dataclass
class Gateway:
    client: httpx.AsyncClient
    rpc: RpcClient
    settings: Settings


@contextlib.asynccontextmanager
async def gateway(
    app_factory: Callable[..., FastAPI], *services: str, **overrides: Any
) -> AsyncIterator[Gateway]:
    """An app forwarding to `services`, started and attached to RabbitMQ."""
    app = app_factory(REDIRECT_SERVICES=",".join(services), **overrides)
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager:
        state = manager._state
        await state["rabbit"].wait_connected(timeout=30)
        await state["rpc"].wait_ready(timeout=30)
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield Gateway(client=client, rpc=state["rpc"], settings=app.state.settings)


@contextlib.asynccontextmanager
async def responder(settings: Settings, service: str, handler: Handler) -> AsyncIterator[None]:
    """A consumer answering `service` requests with `handler` until the block ends."""
    connection = await aio_pika.connect(settings.rabbitmq_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(settings.RMQ_RPC_EXCHANGE, routing_key=service)

        async def on_request(message: AbstractIncomingMessage) -> None:
            async with message.process():
                reply = await handler(orjson.loads(message.body), message)
                if reply is None:
                    return
                body = reply if isinstance(reply, bytes) else orjson.dumps(reply)
                await channel.default_exchange.publish(
                    aio_pika.Message(body, correlation_id=message.correlation_id),
                    routing_key=message.reply_to or "",
                )

        await queue.consume(on_request)
        yield


def echo_handler(status: int = 200, headers: dict[str, str] | None = None) -> Handler:
    """Replies with `status`, `headers` and the request message as the JSON body."""

    async def handle(request: dict[str, Any], _message: AbstractIncomingMessage) -> dict[str, Any]:
        return {"status": status, "headers": headers or {}, "body": request}

    return handle


async def test_round_trip_carries_status_headers_and_json_body(
    app_factory: Callable[..., FastAPI], settings: Settings, user: TestUser
) -> None:
    service = service_name()
    seen: list[AbstractIncomingMessage] = []

    async def handle(request: dict[str, Any], message: AbstractIncomingMessage) -> dict[str, Any]:
        seen.append(message)
        return {
            "status": 201,
            "headers": {"X-Upstream": "inventory", "Location": "/items/42"},
            "body": {"echo": request},
        }

    async with (
        gateway(app_factory, service, REDIRECT_TIMEOUT=3) as gw,
        responder(settings, service, handle),
    ):
        response = await gw.client.post(
            f"/v1/redirect/{service}/items/42?tag=a&tag=b&empty=",
            json={"sku": "ABC-1", "quantity": 2},
            headers={**user.headers, "X-Request-ID": "req-round-trip-1"},
        )

    assert response.status_code == 201, response.text
    assert response.headers["x-upstream"] == "inventory"
    assert response.headers["location"] == "/items/42"
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"] == "req-round-trip-1"
    request = response.json()["echo"]
    assert set(request) == {"method", "path", "query", "headers", "body", "user", "request_id"}
    assert request["method"] == "POST"
    assert request["path"] == "/items/42"
    assert request["query"] == {"tag": ["a", "b"], "empty": [""]}
    assert request["body"] == {"sku": "ABC-1", "quantity": 2}
    assert request["user"] == {"id": str(user.id), "role": "user"}
    assert request["request_id"] == "req-round-trip-1"
    assert request["headers"]["content-type"] == "application/json"

    (message,) = seen
    assert message.reply_to is not None
    assert message.reply_to.startswith("amq.rabbitmq.reply-to")
    assert message.correlation_id
    assert message.content_type == "application/json"
    assert message.expiration == 3
    assert message.routing_key == service
    assert message.exchange == settings.RMQ_RPC_EXCHANGE


async def test_every_method_is_forwarded(
    app_factory: Callable[..., FastAPI], settings: Settings, user: TestUser
) -> None:
    service = service_name()
    async with gateway(app_factory, service) as gw, responder(settings, service, echo_handler()):
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            response = await gw.client.request(
                method, f"/v1/redirect/{service}/things/1", headers=user.headers
            )
            assert response.status_code == 200, (method, response.text)
            assert response.json()["method"] == method
            assert response.json()["body"] is None


async def test_only_the_safe_headers_are_forwarded(
    app_factory: Callable[..., FastAPI], settings: Settings, user: TestUser
) -> None:
    service = service_name()
    sent = {
        **user.headers,
        "Cookie": "session=secret",
        "Accept": "application/json",
        "Accept-Language": "de-CH",
        "User-Agent": "storefront/1.0",
        "X-Tenant": "acme",
        "X-Forwarded-For": "203.0.113.7",
        "X-Forwarded-Proto": "https",
        "Referer": "https://storefront.test/cart",
        "Origin": "http://storefront.test",
        "Idempotency-Key": "k-1",
    }
    async with gateway(app_factory, service) as gw, responder(settings, service, echo_handler()):
        response = await gw.client.get(f"/v1/redirect/{service}/whoami", headers=sent)

    assert response.status_code == 200, response.text
    forwarded = response.json()["headers"]
    assert forwarded == {
        "accept": "application/json",
        "accept-language": "de-CH",
        "user-agent": "storefront/1.0",
        "x-tenant": "acme",
        "x-request-id": response.headers["x-request-id"],
    }
    assert user.token not in response.text
    assert "secret" not in response.text


async def test_reply_cannot_set_hop_by_hop_headers_or_the_request_id(
    app_factory: Callable[..., FastAPI], settings: Settings, user: TestUser
) -> None:
    service = service_name()
    handler = echo_handler(
        headers={
            "X-Request-ID": "forged",
            "Connection": "close",
            "Transfer-Encoding": "chunked",
            "Content-Length": "999",
            "Access-Control-Allow-Origin": "*",
            "RateLimit": '"default";r=999;t=0',
            "X-Kept": "yes",
        }
    )
    async with gateway(app_factory, service) as gw, responder(settings, service, handler):
        response = await gw.client.get(
            f"/v1/redirect/{service}/x", headers={**user.headers, "X-Request-ID": "mine-1"}
        )

    assert response.status_code == 200, response.text
    assert response.headers.get_list("x-request-id") == ["mine-1"]
    assert response.headers["x-kept"] == "yes"
    assert "transfer-encoding" not in response.headers
    assert "connection" not in response.headers
    assert "access-control-allow-origin" not in response.headers
    assert '"default";r=999;t=0' not in response.headers.get_list("ratelimit")
    assert response.headers["content-length"] == str(len(response.content))


async def test_non_json_body_round_trips_as_base64(
    app_factory: Callable[..., FastAPI], settings: Settings, user: TestUser
) -> None:
    service = service_name()
    payload = bytes(range(256)) * 4
    received: list[dict[str, Any]] = []

    async def handle(request: dict[str, Any], _message: AbstractIncomingMessage) -> dict[str, Any]:
        received.append(request)
        data = base64.b64decode(request["body"])
        return {
            "status": 200,
            "headers": {"Content-Type": "image/png"},
            "body": base64.b64encode(data[::-1]).decode(),
            "body_encoding": "base64",
        }

    async with gateway(app_factory, service) as gw, responder(settings, service, handle):
        response = await gw.client.put(
            f"/v1/redirect/{service}/blobs/1",
            content=payload,
            headers={**user.headers, "Content-Type": "application/octet-stream"},
        )

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.content == payload[::-1]
    (request,) = received
    assert request["body_encoding"] == "base64"
    assert base64.b64decode(request["body"]) == payload


async def test_malformed_json_request_body_is_a_validation_error(
    app_factory: Callable[..., FastAPI], user: TestUser
) -> None:
    service = service_name()
    async with gateway(app_factory, service) as gw:
        response = await gw.client.post(
            f"/v1/redirect/{service}/x",
            content=b'{"broken": ',
            headers={**user.headers, "Content-Type": "application/json"},
        )
    assert_problem(response, 422, "validation-error")


async def test_concurrent_calls_each_get_their_own_reply(
    app_factory: Callable[..., FastAPI], settings: Settings, user: TestUser
) -> None:
    service = service_name()

    async def handle(request: dict[str, Any], _message: AbstractIncomingMessage) -> dict[str, Any]:
        n = int(request["query"]["n"][0])
        # Answer out of order, so only the correlation id can pair reply and call.
        await asyncio.sleep((n % 7) * 0.01)
        return {"status": 200, "headers": {"X-N": str(n)}, "body": {"n": n}}

    async with gateway(app_factory, service) as gw, responder(settings, service, handle):
        responses = await asyncio.gather(
            *(
                gw.client.get(f"/v1/redirect/{service}/count?n={n}", headers=user.headers)
                for n in range(100)
            )
        )
        assert gw.rpc.pending == {}

    for n, response in enumerate(responses):
        assert response.status_code == 200, response.text
        assert response.json() == {"n": n}
        assert response.headers["x-n"] == str(n)


async def test_unknown_service_is_not_found(
    app_factory: Callable[..., FastAPI], user: TestUser
) -> None:
    async with gateway(app_factory, service_name()) as gw:
        response = await gw.client.get("/v1/redirect/not-configured/x", headers=user.headers)
    assert_problem(response, 404, "not-found")


async def test_service_without_responder_fails_fast_with_503(
    app_factory: Callable[..., FastAPI], user: TestUser
) -> None:
    service = service_name()
    timeout = 5.0
    async with gateway(app_factory, service, REDIRECT_TIMEOUT=timeout) as gw:
        started = time.perf_counter()
        response = await gw.client.get(f"/v1/redirect/{service}/x", headers=user.headers)
        elapsed = time.perf_counter() - started
        assert gw.rpc.pending == {}

    assert_problem(response, 503, "service-unavailable")
    # Functional bound: the mandatory publish came back; nobody waited for the timeout.
    assert elapsed < timeout / 2


async def test_slow_responder_is_504_and_its_late_reply_is_discarded(
    app_factory: Callable[..., FastAPI], settings: Settings, user: TestUser
) -> None:
    service = service_name()
    late_reply_sent = asyncio.Event()
    calls = 0

    async def handle(request: dict[str, Any], _message: AbstractIncomingMessage) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(1.0)
            reply = {"status": 200, "headers": {}, "body": {"late_for": request["request_id"]}}
            # Published by the caller of this handler right after it returns.
            asyncio.get_running_loop().call_later(0.1, late_reply_sent.set)
            return reply
        return {"status": 200, "headers": {}, "body": {"for": request["request_id"]}}

    async with (
        gateway(app_factory, service, REDIRECT_TIMEOUT=0.5) as gw,
        responder(settings, service, handle),
    ):
        slow = await gw.client.get(
            f"/v1/redirect/{service}/slow", headers={**user.headers, "X-Request-ID": "slow-1"}
        )
        assert_problem(slow, 504, "upstream-timeout")
        await asyncio.wait_for(late_reply_sent.wait(), timeout=10)
        await asyncio.sleep(0.2)  # let the late reply reach the reply consumer
        assert gw.rpc.pending == {}

        fresh = await gw.client.get(
            f"/v1/redirect/{service}/fast", headers={**user.headers, "X-Request-ID": "fast-1"}
        )
        assert fresh.status_code == 200, fresh.text
        assert fresh.json() == {"for": "fast-1"}
        assert gw.rpc.pending == {}


MALFORMED_REPLIES: list[bytes | dict[str, Any] | list[Any]] = [
    b"not json at all",
    [200, {}, None],
    {"headers": {}, "body": None},
    {"status": "200", "headers": {}, "body": None},
    {"status": True, "headers": {}, "body": None},
    {"status": 99, "headers": {}, "body": None},
    {"status": 101, "headers": {}, "body": None},
    {"status": 600, "headers": {}, "body": None},
    {"status": 200, "headers": ["x-a", "1"], "body": None},
    {"status": 200, "headers": {"x-a": 1}, "body": None},
    {"status": 200, "headers": {"x-a": "1\r\nSet-Cookie: stolen=1"}, "body": None},
    {"status": 200, "headers": {"bad name": "1"}, "body": None},
    {"status": 200, "headers": {}, "body": {"a": 1}, "body_encoding": "gzip"},
    {"status": 200, "headers": {}, "body": 12, "body_encoding": "base64"},
    {"status": 200, "headers": {}, "body": "@@not base64@@", "body_encoding": "base64"},
]


async def test_malformed_reply_is_bad_gateway(
    app_factory: Callable[..., FastAPI], settings: Settings, user: TestUser
) -> None:
    service = service_name()

    async def handle(request: dict[str, Any], _message: AbstractIncomingMessage) -> bytes:
        reply = MALFORMED_REPLIES[int(request["query"]["case"][0])]
        return reply if isinstance(reply, bytes) else orjson.dumps(reply)

    async with gateway(app_factory, service) as gw, responder(settings, service, handle):
        for case, reply in enumerate(MALFORMED_REPLIES):
            response = await gw.client.get(
                f"/v1/redirect/{service}/x?case={case}", headers=user.headers
            )
            assert response.status_code == 502, (reply, response.text)
            assert_problem(response, 502, "bad-gateway")
            assert "stolen" not in response.headers.get("set-cookie", "")


async def test_unauthenticated_call_is_401(app_factory: Callable[..., FastAPI]) -> None:
    service = service_name()
    async with gateway(app_factory, service) as gw:
        for headers in ({}, {"Authorization": "Bearer not-a-token"}):
            response = await gw.client.get(f"/v1/redirect/{service}/x", headers=headers)
            assert_problem(response, 401, "unauthorized")
            assert response.headers["www-authenticate"] == "Bearer"


async def test_body_over_one_mebibyte_is_413(
    app_factory: Callable[..., FastAPI], user: TestUser
) -> None:
    service = service_name()
    async with gateway(app_factory, service) as gw:
        response = await gw.client.post(
            f"/v1/redirect/{service}/upload",
            content=b"x" * (1024 * 1024 + 1),
            headers={**user.headers, "Content-Type": "application/octet-stream"},
        )
    assert_problem(response, 413, "payload-too-large")


async def test_waiting_for_a_slow_service_holds_no_database_connection(
    app_factory: Callable[..., FastAPI], settings: Settings, user: TestUser
) -> None:
    slow_service, fast_service = service_name(), service_name()
    slow_started = asyncio.Event()

    async def slow(request: dict[str, Any], _message: AbstractIncomingMessage) -> dict[str, Any]:
        slow_started.set()
        await asyncio.sleep(1.5)
        return {"status": 200, "headers": {}, "body": {"slow": True}}

    async with (
        # One pooled connection: a call that kept it while waiting would block the next one.
        gateway(
            app_factory,
            slow_service,
            fast_service,
            POSTGRES_POOL_SIZE=1,
            POSTGRES_MAX_OVERFLOW=0,
        ) as gw,
        responder(settings, slow_service, slow),
        responder(settings, fast_service, echo_handler()),
    ):
        slow_call = asyncio.create_task(
            gw.client.get(f"/v1/redirect/{slow_service}/x", headers=user.headers)
        )
        await asyncio.wait_for(slow_started.wait(), timeout=10)
        fast = await gw.client.get(f"/v1/redirect/{fast_service}/x", headers=user.headers)
        assert fast.status_code == 200, fast.text
        assert not slow_call.done()
        assert (await slow_call).json() == {"slow": True}


async def test_openapi_lists_each_forwarded_method(client: httpx.AsyncClient) -> None:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    operations = response.json()["paths"]["/v1/redirect/{service}/{path}"]
    assert set(operations) == {"get", "post", "put", "patch", "delete"}
    ids = [operation["operationId"] for operation in operations.values()]
    assert len(set(ids)) == len(ids)


async def test_rpc_echo_module_answers_through_the_gateway(
    app_factory: Callable[..., FastAPI], settings: Settings, user: TestUser
) -> None:
    service = service_name()
    env = {**os.environ, "RMQ_RPC_EXCHANGE": settings.RMQ_RPC_EXCHANGE, "LOGLEVEL": "INFO"}
    async with gateway(app_factory, service) as gw:
        process = subprocess.Popen(
            [sys.executable, "-m", "api.rpc_echo", service],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            response = None
            deadline = time.monotonic() + 30
            for _ in range(300):
                response = await gw.client.patch(
                    f"/v1/redirect/{service}/hello?x=1", json={"hi": 1}, headers=user.headers
                )
                if response.status_code != 503 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
        finally:
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=15)

    assert response is not None
    assert response.status_code == 200, response.text
    assert response.headers["x-echo-service"] == service
    echoed = response.json()
    assert echoed["method"] == "PATCH"
    assert echoed["path"] == "/hello"
    assert echoed["query"] == {"x": ["1"]}
    assert echoed["body"] == {"hi": 1}
    assert echoed["user"] == {"id": str(user.id), "role": "user"}
    assert process.returncode == 0, stderr.decode()


@pytest.mark.faults
async def test_rabbitmq_down_is_503_and_the_gateway_recovers(
    app_factory: Callable[..., FastAPI], settings: Settings, user: TestUser
) -> None:
    service = service_name()
    timeout = 20.0
    request_seen = asyncio.Event()

    async def never_answer(
        _request: dict[str, Any], _message: AbstractIncomingMessage
    ) -> dict[str, Any] | None:
        request_seen.set()
        return None

    async with gateway(app_factory, service, REDIRECT_TIMEOUT=timeout) as gw:
        async with responder(settings, service, never_answer):
            in_flight = asyncio.create_task(
                gw.client.get(f"/v1/redirect/{service}/in-flight", headers=user.headers)
            )
            await asyncio.wait_for(request_seen.wait(), timeout=10)
            async with rabbitmq_stopped():
                # Its reply could only come back on the lost channel: it fails now, not at 20 s.
                lost = await asyncio.wait_for(in_flight, timeout=timeout / 2)
                assert_problem(lost, 503, "service-unavailable")
                assert gw.rpc.pending == {}

                started = time.perf_counter()
                down = await gw.client.get(f"/v1/redirect/{service}/x", headers=user.headers)
                elapsed = time.perf_counter() - started
                assert_problem(down, 503, "service-unavailable")
                assert elapsed < timeout / 2

        # The robust connection comes back by itself and restores the reply consumer.
        async with responder(settings, service, echo_handler()):
            response = None
            deadline = time.monotonic() + 60
            for _ in range(600):
                response = await gw.client.get(f"/v1/redirect/{service}/x", headers=user.headers)
                if response.status_code == 200 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert response is not None
            assert response.status_code == 200, response.text
            assert response.json()["path"] == "/x"
            assert gw.rpc.pending == {}
