"""Rate limits and the response cache as a client sees them (SPEC §6, §7, §12).

Every test runs on each Redis topology (standalone, a 6-node cluster, Sentinel): the
same assertions must hold on all of them. Tests that stop the shared Redis run on
standalone only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aio_pika
import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.pool import Pool

from api.configs import Settings
from api.helpers.orjson_coder import dumps
from api.redis_core.client import close_redis, create_redis
from tests.conftest import RUN_ID, run_settings
from tests.event_helpers import delete_rabbit_names
from tests.factories import TestUser, make_order, make_user
from tests.problems import assert_problem
from tests.redis_servers import topology_overrides
from tests.services import redis_stopped

TOPOLOGIES = ("standalone", "cluster", "sentinel")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Each test once per topology; a test that stops the shared Redis on standalone only."""
    if "topology" in metafunc.fixturenames:
        stops_redis = metafunc.definition.get_closest_marker("faults") is not None
        topologies = ("standalone",) if stops_redis else TOPOLOGIES
        metafunc.parametrize("topology", topologies, scope="module")


@pytest.fixture(scope="module")
def topology_settings(topology: str, request: pytest.FixtureRequest) -> dict[str, str]:
    """Settings of this topology, with RabbitMQ names of its own (its own status consumer)."""
    names = f"test.{RUN_ID}.{topology}"
    return {
        **topology_overrides(topology, request),
        "RMQ_EXCHANGE": f"{names}.orders",
        "RMQ_QUEUE": f"{names}.orders.events",
        "RMQ_STATUS_QUEUE": f"{names}.orders.status-updates",
        "RMQ_RPC_EXCHANGE": f"{names}.orders.rpc",
    }


@pytest.fixture(scope="module")
async def app_factory(
    app_factory: Callable[..., FastAPI], topology_settings: dict[str, str]
) -> AsyncIterator[Callable[..., FastAPI]]:
    def build(**overrides: Any) -> FastAPI:
        return app_factory(**{**topology_settings, **overrides})

    yield build
    await delete_rabbit_names(run_settings(**topology_settings))


@pytest.fixture(scope="module")
async def topology_app(app_factory: Callable[..., FastAPI]) -> AsyncIterator[FastAPI]:
    async with LifespanManager(app_factory(), startup_timeout=30, shutdown_timeout=30) as manager:
        await manager._state["rabbit"].wait_connected(timeout=30)
        yield manager.app  # type: ignore[misc]


@pytest.fixture(scope="module")
async def client(topology_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=topology_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


@pytest.fixture(scope="module")
async def topology_redis(topology_settings: dict[str, str]) -> AsyncIterator[Any]:
    """A client of this topology for assertions."""
    client = create_redis(run_settings(**topology_settings))
    yield client
    await close_redis(client)


def fresh(app_factory: Callable[..., FastAPI], **overrides: str) -> FastAPI:
    """An app whose buckets start full: its own key prefix under this run's."""
    prefix = f"{run_settings().REDIS_KEY_PREFIX}{uuid.uuid4().hex[:8]}:"
    return app_factory(REDIS_KEY_PREFIX=prefix, **overrides)


@contextlib.asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with LifespanManager(app, startup_timeout=30) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield client


@contextlib.asynccontextmanager
async def request_queries() -> AsyncIterator[list[str]]:
    """SQL on the users and orders tables sent by any engine in this process meanwhile:
    through SQLAlchemy, and straight to asyncpg on a `raw_connection` (every pooled
    connection checked out meanwhile gets a query logger).

    (Background workers such as the outbox relay touch only their own tables.)
    """
    statements: list[str] = []
    logged: list[Any] = []

    def keep(statement: str) -> None:
        if "users" in statement or "orders" in statement:
            statements.append(statement)

    def record(_conn, _cursor, statement, *_args) -> None:  # type: ignore[no-untyped-def]
        keep(statement)

    def log_raw(query: Any) -> None:
        keep(query.query)

    def watch(dbapi_connection, _record, _proxy) -> None:  # type: ignore[no-untyped-def]
        driver = dbapi_connection.driver_connection
        if driver not in logged:
            driver.add_query_logger(log_raw)
            logged.append(driver)

    event.listen(Engine, "before_cursor_execute", record)
    event.listen(Pool, "checkout", watch)
    try:
        yield statements
        await asyncio.sleep(0)  # asyncpg calls its query loggers on the next loop pass
    finally:
        event.remove(Engine, "before_cursor_execute", record)
        event.remove(Pool, "checkout", watch)
        for driver in logged:
            driver.remove_query_logger(log_raw)


async def test_login_refused_after_the_auth_quota_per_ip(
    app_factory: Callable[..., FastAPI],
) -> None:
    async with serve(fresh(app_factory, RATE_LIMIT_AUTH="3/60")) as client:
        body = {"email": "nobody@example.com", "password": "not-the-password"}
        answers = [await client.post("/v1/auth/login", json=body) for _ in range(4)]
    assert [r.status_code for r in answers] == [401, 401, 401, 429]
    refused = answers[3]
    assert_problem(refused, 429, "rate-limited")
    assert refused.headers["retry-after"] == "20"
    assert refused.headers["ratelimit-policy"] == '"auth";q=3;w=60'
    assert refused.headers["ratelimit"] == '"auth";r=0;t=60'
    assert answers[0].headers["ratelimit"] == '"auth";r=2;t=20'


async def test_auth_policy_counts_per_ip_even_with_a_token(
    app_factory: Callable[..., FastAPI],
    sessionmaker: async_sessionmaker[AsyncSession],
    settings: Settings,
) -> None:
    users = [await make_user(sessionmaker, settings) for _ in range(3)]
    async with serve(fresh(app_factory, RATE_LIMIT_AUTH="2/60")) as client:
        codes = [
            (
                await client.post(
                    "/v1/auth/login",
                    json={"email": user.email, "password": "wrong password!"},
                    headers=user.headers,
                )
            ).status_code
            for user in users
        ]
    assert codes == [401, 401, 429]


async def test_default_policy_headers_on_every_v1_response(
    app_factory: Callable[..., FastAPI], user: TestUser
) -> None:
    async with serve(fresh(app_factory, RATE_LIMIT_DEFAULT="5/60")) as client:
        me = await client.get("/v1/auth/me", headers=user.headers)
        listed = await client.get("/v1/orders", headers=user.headers)
        missing = await client.get(
            "/v1/orders/00000000-0000-0000-0000-000000000000", headers=user.headers
        )
    assert me.status_code == 200
    assert me.headers["ratelimit-policy"] == '"default";q=5;w=60'
    assert me.headers["ratelimit"] == '"default";r=4;t=12'
    assert listed.headers["ratelimit"] == '"default";r=3;t=24'
    assert missing.status_code == 404
    assert missing.headers["ratelimit"] == '"default";r=2;t=36'


async def test_sixth_request_in_the_window_is_429(
    app_factory: Callable[..., FastAPI], user: TestUser
) -> None:
    async with serve(fresh(app_factory, RATE_LIMIT_DEFAULT="5/60")) as client:
        codes = [
            (await client.get("/v1/orders", headers=user.headers)).status_code for _ in range(6)
        ]
        peek = await client.get("/v1/rate-limits", headers=user.headers)
    assert codes == [200] * 5 + [429]
    default = next(p for p in peek.json()["policies"] if p["name"] == "default")
    assert default == {"name": "default", "quota": 5, "window": 60, "remaining": 0, "reset": 60}


async def test_orders_create_policy_is_per_user(
    app_factory: Callable[..., FastAPI],
    sessionmaker: async_sessionmaker[AsyncSession],
    settings: Settings,
) -> None:
    alice = await make_user(sessionmaker, settings)
    bob = await make_user(sessionmaker, settings)
    async with serve(fresh(app_factory, RATE_LIMIT_ORDERS_CREATE="2/60")) as client:
        body = {"currency": "EUR", "items": [{"sku": "A", "quantity": 1, "unit_price": 1}]}
        alice_codes = [
            (await client.post("/v1/orders", json=body, headers=alice.headers)).status_code
            for _ in range(3)
        ]
        bob_code = (await client.post("/v1/orders", json=body, headers=bob.headers)).status_code
    assert alice_codes == [201, 201, 429]
    assert bob_code == 201


async def test_ops_routes_are_never_limited(app_factory: Callable[..., FastAPI]) -> None:
    async with serve(fresh(app_factory, RATE_LIMIT_DEFAULT="1/60")) as client:
        for path in (
            "/ping",
            "/livez",
            "/ping/ready",
            "/readyz",
            "/metrics",
            "/openapi.json",
            "/docs",
        ):
            for _ in range(3):
                response = await client.get(path)
                assert response.status_code == 200, path
                assert "ratelimit" not in response.headers, path


async def test_reading_rate_limits_costs_no_token(
    app_factory: Callable[..., FastAPI], user: TestUser
) -> None:
    async with serve(fresh(app_factory, RATE_LIMIT_DEFAULT="3/60")) as client:
        for _ in range(5):
            response = await client.get("/v1/rate-limits", headers=user.headers)
            assert response.status_code == 200
        policies = {p["name"]: p for p in response.json()["policies"]}
    assert set(policies) == {"default", "auth", "orders_create"}
    assert policies["default"]["remaining"] == 3
    assert policies["auth"]["quota"] == 100000


async def test_limit_holds_across_two_server_instances(
    app_factory: Callable[..., FastAPI], user: TestUser
) -> None:
    shared = {"RATE_LIMIT_DEFAULT": "4/60", "REDIS_KEY_PREFIX": f"{uuid.uuid4().hex[:8]}:"}
    async with (
        serve(app_factory(**shared)) as first,
        serve(app_factory(**shared)) as second,
    ):
        codes = [
            (await client.get("/v1/auth/me", headers=user.headers)).status_code
            for client in (first, second, first, second, first, second)
        ]
    assert codes == [200, 200, 200, 200, 429, 429]


async def test_x_forwarded_for_is_ignored_from_untrusted_peers(
    app_factory: Callable[..., FastAPI],
) -> None:
    async with serve(fresh(app_factory, RATE_LIMIT_AUTH="1/60")) as client:
        body = {"email": "x@example.com", "password": "whatever-pass"}
        first = await client.post(
            "/v1/auth/login", json=body, headers={"X-Forwarded-For": "10.0.0.1"}
        )
        second = await client.post(
            "/v1/auth/login", json=body, headers={"X-Forwarded-For": "10.0.0.2"}
        )
    assert (first.status_code, second.status_code) == (401, 429)


async def test_x_forwarded_for_counts_from_a_trusted_proxy(
    app_factory: Callable[..., FastAPI],
) -> None:
    async with serve(
        fresh(app_factory, RATE_LIMIT_AUTH="1/60", TRUSTED_PROXIES="127.0.0.1")
    ) as client:
        body = {"email": "x@example.com", "password": "whatever-pass"}
        first = await client.post(
            "/v1/auth/login", json=body, headers={"X-Forwarded-For": "10.9.0.1"}
        )
        second = await client.post(
            "/v1/auth/login", json=body, headers={"X-Forwarded-For": "10.9.0.2"}
        )
        third = await client.post(
            "/v1/auth/login", json=body, headers={"X-Forwarded-For": "10.9.0.2"}
        )
    assert (first.status_code, second.status_code, third.status_code) == (401, 401, 429)


# --- cache -----------------------------------------------------------------------------


async def test_second_read_is_a_hit_with_cache_headers(
    client: httpx.AsyncClient, user: TestUser
) -> None:
    order = await make_order(client, user)
    first = await client.get(f"/v1/orders/{order['id']}", headers=user.headers)
    second = await client.get(f"/v1/orders/{order['id']}", headers=user.headers)
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    assert second.content == first.content
    assert second.headers["etag"] == first.headers["etag"]
    for response in (first, second):
        assert response.headers["cache-control"] == "private"
        assert "Authorization" in [v.strip() for v in response.headers["vary"].split(",")]
        assert response.headers["content-type"] == "application/json"


async def test_cache_hit_sends_no_sql(client: httpx.AsyncClient, user: TestUser) -> None:
    order = await make_order(client, user)
    await client.get(f"/v1/orders/{order['id']}", headers=user.headers)
    async with request_queries() as statements:
        await client.get(
            f"/v1/orders/{order['id']}", headers={**user.headers, "Cache-Control": "no-cache"}
        )
    assert statements, "the query counter sees the bypassed read"
    async with request_queries() as statements:
        hit = await client.get(f"/v1/orders/{order['id']}", headers=user.headers)
    assert hit.headers["x-cache"] == "HIT"
    assert statements == []


async def test_if_none_match_on_a_cached_order_is_304(
    client: httpx.AsyncClient, user: TestUser
) -> None:
    order = await make_order(client, user)
    first = await client.get(f"/v1/orders/{order['id']}", headers=user.headers)
    again = await client.get(
        f"/v1/orders/{order['id']}",
        headers={**user.headers, "If-None-Match": first.headers["etag"]},
    )
    assert again.status_code == 304
    assert again.headers["x-cache"] == "HIT"
    assert again.headers["etag"] == first.headers["etag"]


@pytest.mark.parametrize("write", ["cancel", "patch"])
async def test_read_after_write_is_never_stale(
    client: httpx.AsyncClient, user: TestUser, admin: TestUser, write: str
) -> None:
    order = await make_order(client, user)
    url = f"/v1/orders/{order['id']}"
    for viewer in (user, admin):
        await client.get(url, headers=viewer.headers)
        assert (await client.get(url, headers=viewer.headers)).headers["x-cache"] == "HIT"
    listed = await client.get("/v1/orders", headers=user.headers)
    assert listed.json()["items"][0]["status"] == "pending"
    if write == "cancel":
        changed = await client.post(f"{url}/cancel", headers=user.headers)
        expected = "cancelled"
    else:
        changed = await client.patch(url, json={"status": "paid"}, headers=admin.headers)
        expected = "paid"
    assert changed.status_code == 200
    for viewer in (user, admin):
        after = await client.get(url, headers=viewer.headers)
        assert after.headers["x-cache"] == "MISS"
        assert after.json()["status"] == expected
        assert after.json()["version"] == 2
    listed = await client.get("/v1/orders", headers=user.headers)
    assert listed.json()["items"][0]["status"] == expected


async def test_list_is_cached_and_sees_a_new_order(
    client: httpx.AsyncClient, user: TestUser
) -> None:
    await make_order(client, user)
    await client.get("/v1/orders", headers=user.headers)
    hit = await client.get("/v1/orders", headers=user.headers)
    assert hit.headers["x-cache"] == "HIT"
    assert len(hit.json()["items"]) == 1
    await make_order(client, user)
    after = await client.get("/v1/orders", headers=user.headers)
    assert after.headers["x-cache"] == "MISS"
    assert len(after.json()["items"]) == 2


async def test_an_admins_cached_list_sees_any_users_new_order(
    client: httpx.AsyncClient, user: TestUser, other_user: TestUser, admin: TestUser
) -> None:
    url = f"/v1/orders?user_id={other_user.id}"
    await client.get(url, headers=admin.headers)
    assert (await client.get(url, headers=admin.headers)).headers["x-cache"] == "HIT"
    await make_order(client, user)  # another user's write: the admins' counter moves
    assert (await client.get(url, headers=admin.headers)).headers["x-cache"] == "MISS"
    order = await make_order(client, other_user)
    after = await client.get(url, headers=admin.headers)
    assert after.headers["x-cache"] == "MISS"
    assert [item["id"] for item in after.json()["items"]] == [order["id"]]


async def test_cache_is_per_viewer(
    client: httpx.AsyncClient, user: TestUser, other_user: TestUser
) -> None:
    order = await make_order(client, user)
    url = f"/v1/orders/{order['id']}"
    await client.get(url, headers=user.headers)
    assert (await client.get(url, headers=user.headers)).headers["x-cache"] == "HIT"
    for _ in range(2):
        stranger = await client.get(url, headers=other_user.headers)
        assert stranger.status_code == 404
    stranger_list = await client.get("/v1/orders", headers=other_user.headers)
    assert stranger_list.json()["items"] == []


async def test_no_cache_request_bypasses(client: httpx.AsyncClient, user: TestUser) -> None:
    order = await make_order(client, user)
    url = f"/v1/orders/{order['id']}"
    await client.get(url, headers=user.headers)
    fresh = await client.get(url, headers={**user.headers, "Cache-Control": "no-cache"})
    assert fresh.headers["x-cache"] == "BYPASS"
    assert fresh.status_code == 200


async def test_cache_keys_live_under_the_prefix(
    client: httpx.AsyncClient,
    user: TestUser,
    topology_redis: Any,
    settings: Settings,
) -> None:
    order = await make_order(client, user)
    await client.get(f"/v1/orders/{order['id']}", headers=user.headers)
    redis = topology_redis
    keys = [key async for key in redis.scan_iter(match=f"*{user.id}*")]
    assert keys
    assert all(key.decode().startswith(settings.REDIS_KEY_PREFIX) for key in keys)
    # The owner's bucket, generation and entries share one hash tag: one cluster slot.
    assert all(f"{{user:{user.id}}}" in key.decode() for key in keys)
    entry = await redis.get(next(k for k in keys if order["id"].encode() in k))
    assert json.loads(entry.split(b"\n", 2)[2])["id"] == order["id"]


async def test_status_update_from_the_queue_invalidates_the_cached_read(
    client: httpx.AsyncClient, user: TestUser, admin: TestUser, topology_settings: dict[str, str]
) -> None:
    order = await make_order(client, user)
    url = f"/v1/orders/{order['id']}"
    for viewer in (user, admin):
        await client.get(url, headers=viewer.headers)
        assert (await client.get(url, headers=viewer.headers)).headers["x-cache"] == "HIT"
    settings = run_settings(**topology_settings)
    connection = await aio_pika.connect(settings.rabbitmq_url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.default_exchange.publish(
            aio_pika.Message(
                dumps({"order_id": order["id"], "status": "paid"}),
                content_type="application/json",
                message_id=str(uuid.uuid4()),
            ),
            routing_key=settings.RMQ_STATUS_QUEUE,
        )
    # Without the invalidation the cached `pending` would be served until the TTL.
    deadline = asyncio.get_running_loop().time() + 10
    for viewer in (user, admin):
        while (after := await client.get(url, headers=viewer.headers)).json()["status"] != "paid":
            assert asyncio.get_running_loop().time() < deadline, "still the cached read"
            await asyncio.sleep(0.05)
        assert after.headers["x-cache"] == "MISS"
        assert (await client.get(url, headers=viewer.headers)).headers["x-cache"] == "HIT"


@pytest.mark.faults
async def test_redis_down_bypasses_cache_and_limits_per_process(
    app_factory: Callable[..., FastAPI],
    sessionmaker: async_sessionmaker[AsyncSession],
    settings: Settings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    user = await make_user(sessionmaker, settings)
    async with serve(fresh(app_factory, RATE_LIMIT_DEFAULT="4/60")) as client:
        order = await make_order(client, user)
        url = f"/v1/orders/{order['id']}"
        capsys.readouterr()
        async with redis_stopped():
            answers = [await client.get(url, headers=user.headers) for _ in range(5)]
        logged = capsys.readouterr().out
        # Redis is back: its bucket for this user was never touched during the outage.
        await asyncio.sleep(1.1)
        back = await client.get(url, headers=user.headers)
        metrics = await client.get("/metrics")
    assert [r.status_code for r in answers] == [200, 200, 200, 200, 429]
    assert all(r.headers.get("x-cache", "BYPASS") == "BYPASS" for r in answers[:4])
    assert answers[0].json()["id"] == order["id"]
    assert logged.count("rate limiting falls back") == 1
    assert back.status_code == 200
    assert back.headers["x-cache"] in ("MISS", "HIT")
    assert "rate_limit_fallback_total" in metrics.text


async def test_concurrent_misses_read_postgres_once(
    app_factory: Callable[..., FastAPI], user: TestUser
) -> None:
    async with serve(fresh(app_factory)) as client:
        order = await make_order(client, user)
        url = f"/v1/orders/{order['id']}"
        async with request_queries() as statements:
            answers = await asyncio.gather(
                *(client.get(url, headers=user.headers) for _ in range(20))
            )
        again = await client.get(url, headers=user.headers)
    assert {a.headers["x-cache"] for a in answers} <= {"MISS", "HIT"}
    assert {a.content for a in answers} == {answers[0].content}
    order_reads = [s for s in statements if "orders" in s]
    assert len(order_reads) == 1, order_reads
    assert again.headers["x-cache"] == "HIT"


async def test_with_the_limiter_off_the_cache_still_serves_and_invalidates(
    app_factory: Callable[..., FastAPI], user: TestUser
) -> None:
    async with serve(fresh(app_factory, RATE_LIMIT_ENABLED="false")) as client:
        order = await make_order(client, user)
        url = f"/v1/orders/{order['id']}"
        first = await client.get(url, headers=user.headers)
        async with request_queries() as statements:
            hit = await client.get(url, headers=user.headers)
        cancelled = await client.post(f"{url}/cancel", headers=user.headers)
        after = await client.get(url, headers=user.headers)
    assert first.headers["x-cache"] == "MISS"
    assert hit.headers["x-cache"] == "HIT"
    assert statements == []
    assert "ratelimit" not in hit.headers
    assert cancelled.status_code == 200
    assert after.headers["x-cache"] == "MISS"
    assert after.json()["status"] == "cancelled"
