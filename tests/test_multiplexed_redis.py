"""The pipelined Redis connection of the per-request scripts, against real Redis."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from api.redis_core.lua_script import TOKEN_BUCKET
from api.redis_core.multiplexed import MultiplexedRedis
from api.redis_core.rate_limiter import RateLimiter
from tests.conftest import run_settings
from tests.services import redis_paused


def _key(name: str) -> str:
    return f"{run_settings().REDIS_KEY_PREFIX}mux:{name}:{uuid.uuid4().hex}"


async def test_concurrent_callers_each_get_their_own_reply() -> None:
    mux = MultiplexedRedis(run_settings())
    keys = [_key("incr") for _ in range(200)]
    try:
        # Key i is incremented i + 1 times; every reply must be its own caller's count.
        calls = [(key, n) for n, key in enumerate(keys) for n in range(n + 1)]
        replies = await asyncio.gather(*(mux.execute("INCR", key) for key, _ in calls))
        finals = await asyncio.gather(*(mux.execute("GET", key) for key in keys))
    finally:
        await mux.execute("DEL", *keys)
        await mux.close()
    assert sorted(replies) == sorted(n + 1 for _, n in calls)
    assert finals == [str(n + 1).encode() for n in range(len(keys))]


async def test_error_reply_fails_only_its_caller() -> None:
    mux = MultiplexedRedis(run_settings())
    key = _key("text")
    try:
        await mux.execute("SET", key, "not a number")
        failed, ok = await asyncio.gather(
            mux.execute("INCR", key), mux.execute("ECHO", "fine"), return_exceptions=True
        )
    finally:
        await mux.execute("DEL", key)
        await mux.close()
    assert isinstance(failed, ResponseError)
    assert ok == b"fine"


async def test_script_is_sent_again_after_script_flush(redis: Redis) -> None:
    settings = run_settings(RATE_LIMIT_DEFAULT="3/60")
    mux = MultiplexedRedis(settings)
    limiter = RateLimiter(redis, settings, scripts=mux)
    identity = f"user:{uuid.uuid4()}"
    try:
        first = await limiter.hit("default", identity)
        await redis.script_flush()
        second = await limiter.hit("default", identity)
        third = await limiter.hit("default", identity)
        refused = await limiter.hit("default", identity)
        script_known = await redis.script_exists(
            hashlib.sha1(TOKEN_BUCKET.encode(), usedforsecurity=False).hexdigest()
        )
    finally:
        await mux.close()
    assert [d.backend for d in (first, second, third, refused)] == ["redis"] * 4
    assert [d.remaining for d in (first, second, third)] == [2, 1, 0]
    assert not refused.allowed
    assert script_known == [True]


@pytest.mark.faults
async def test_a_paused_redis_times_out_every_waiting_caller_then_recovers() -> None:
    mux = MultiplexedRedis(run_settings(REDIS_SOCKET_TIMEOUT=0.3))
    try:
        assert await mux.execute("PING") == b"PONG"
        async with redis_paused(2000):
            loop = asyncio.get_running_loop()
            started = loop.time()
            outcomes = await asyncio.gather(
                *(mux.execute("PING") for _ in range(5)), return_exceptions=True
            )
            waited = loop.time() - started
        # After the pause a new connection answers.
        assert await mux.execute("PING") == b"PONG"
    finally:
        await mux.close()
    assert all(isinstance(outcome, RedisTimeoutError) for outcome in outcomes), outcomes
    assert waited < 1.0  # one timeout for all of them, not one each


async def test_a_killed_connection_is_replaced_by_the_next_call(redis: Redis) -> None:
    mux = MultiplexedRedis(run_settings())
    try:
        client_id = await mux.execute("CLIENT", "ID")
        killed = await redis.execute_command("CLIENT", "KILL", "ID", client_id)
        await asyncio.sleep(0.1)  # the loop notices the closed socket
        after = await mux.execute("ECHO", "after")
    finally:
        await mux.close()
    assert killed >= 1
    assert after == b"after"


async def test_unreachable_redis_is_a_connection_error_and_a_closed_client_reconnects() -> None:
    unreachable = MultiplexedRedis(run_settings(REDIS_PORT=1, REDIS_SOCKET_TIMEOUT=0.3))
    with pytest.raises(RedisConnectionError):
        await unreachable.execute("PING")
    mux = MultiplexedRedis(run_settings())
    await mux.close()
    assert await mux.execute("PING") == b"PONG"
    await mux.close()


async def test_a_malformed_reply_fails_the_caller_and_the_next_call_reconnects(
    caplog: pytest.LogCaptureFixture,
) -> None:
    connections = 0

    async def fake_redis(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Answers the two setup commands (SELECT, CLIENT SETNAME) with +OK, then, on the
        # first connection, something that is not RESP at all; later ones answer PING.
        nonlocal connections
        connections += 1
        first = connections == 1
        answered = 0
        while line := await reader.readline():
            if not line.startswith(b"*"):
                continue
            answered += 1
            if answered <= 2:
                writer.write(b"+OK\r\n")
            else:
                writer.write(b"!garbage\r\n" if first else b"+PONG\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(fake_redis, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    mux = MultiplexedRedis(run_settings(REDIS_PORT=port, REDIS_SOCKET_TIMEOUT=1))
    try:
        with pytest.raises(RedisConnectionError):
            await mux.execute("PING")
        assert await mux.execute("PING") == b"PONG"
    finally:
        await mux.close()
        server.close()
        await server.wait_closed()
    assert connections == 2
    # Handled as a broken connection, not left to the event loop's "fatal error" path.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
