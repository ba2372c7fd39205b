"""The operator CLI (`python -m api.cli`): promote-admin, clean, and one-line failures."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import uuid

import aio_pika
import aiormq
import httpx
import pytest
from redis.asyncio import Redis

from api.configs import Settings
from api.database.connection import connect_raw
from api.rabbit_core.topology import TopologyNames, declare_topology
from tests.event_helpers import scratch_events_environment, settings_env
from tests.factories import TestUser


async def run_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the documented command in a child process pointed at this run's database."""
    env = {
        **os.environ,
        "POSTGRES_HOST": settings.POSTGRES_HOST,
        "POSTGRES_PORT": str(settings.POSTGRES_PORT),
        "POSTGRES_USER": settings.POSTGRES_USER,
        "POSTGRES_PASSWORD": settings.POSTGRES_PASSWORD.get_secret_value(),
        "POSTGRES_DB": settings.POSTGRES_DB,
    }
    command = ["uv", "run", "--no-sync", "python", "-m", "api.cli", *args]
    return await asyncio.to_thread(
        subprocess.run, command, env=env, capture_output=True, text=True, timeout=60, check=False
    )


async def test_promote_admin_gives_an_existing_user_the_admin_role(
    client: httpx.AsyncClient, settings: Settings, database: str, user: TestUser
) -> None:
    before = await client.get("/v1/auth/me", headers=user.headers)
    assert before.json()["role"] == "user"

    result = await run_cli(settings, "promote-admin", user.email.upper())
    assert result.returncode == 0, result.stderr
    assert user.email in result.stdout

    # The role is read from the database on every request: the same token is now an admin's.
    after = await client.get("/v1/auth/me", headers=user.headers)
    assert after.json()["role"] == "admin"


async def test_promote_admin_of_an_unknown_email_fails_with_a_clear_message(
    settings: Settings, database: str
) -> None:
    email = f"nobody-{uuid.uuid4().hex[:8]}@example.com"
    result = await run_cli(settings, "promote-admin", email)
    assert result.returncode != 0
    assert "no user" in result.stderr
    assert email in result.stderr
    assert result.stdout == ""


def _cli(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *args],
        env=settings_env(settings, **env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _closed_loopback_port() -> int:
    with socket.socket() as probe:
        for port in range(18599, 18500, -1):
            if probe.connect_ex(("127.0.0.1", port)) != 0:
                return port
    raise RuntimeError("every port in 18501-18599 answers")


@pytest.mark.parametrize("command", [("promote-admin", "ada@example.com"), ("create-database",)])
def test_cli_against_a_postgres_that_is_not_there_fails_in_one_line(
    settings: Settings, command: tuple[str, ...]
) -> None:
    port = _closed_loopback_port()
    result = _cli(settings, *command, POSTGRES_PORT=str(port))
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"{command[0]}: PostgreSQL on 127.0.0.1:{port} is not answering")
    assert "docker compose up -d postgres" in line
    assert result.stdout == ""


def test_promote_admin_against_a_missing_database_fails_in_one_line(settings: Settings) -> None:
    missing = f"orders_missing_{uuid.uuid4().hex[:8]}"
    result = _cli(settings, "promote-admin", "ada@example.com", POSTGRES_DB=missing)
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert f"database {missing!r} does not exist" in line
    assert "make migrate" in line
    assert "Traceback" not in result.stderr


async def test_clean_drops_the_database_the_prefixed_keys_and_the_rabbitmq_names(
    settings: Settings, redis: Redis
) -> None:
    async with scratch_events_environment(settings) as scratch:
        prefix = f"{settings.REDIS_KEY_PREFIX}clean-{uuid.uuid4().hex[:6]}:"
        outside = f"{settings.REDIS_KEY_PREFIX}kept-{uuid.uuid4().hex[:6]}"
        await redis.mset({f"{prefix}a": 1, f"{prefix}{{u1}}:b": 2, outside: 3})
        connection = await aio_pika.connect(scratch.rabbitmq_url, timeout=10)
        async with connection:
            await declare_topology(await connection.channel(), TopologyNames.from_settings(scratch))
        env = {"REDIS_KEY_PREFIX": prefix, "REDIS_DB": str(settings.REDIS_DB)}

        # Without --yes and without a terminal nothing is deleted.
        refused = await asyncio.to_thread(_cli, scratch, "clean", **env)
        assert refused.returncode == 1
        assert "not confirmed" in refused.stderr
        assert scratch.POSTGRES_DB in refused.stderr  # the prompt names what would go
        assert await _database_exists(scratch)

        done = await asyncio.to_thread(_cli, scratch, "clean", "--yes", **env)
        assert done.returncode == 0, done.stderr
        assert not await _database_exists(scratch)
        assert await redis.exists(f"{prefix}a", f"{prefix}{{u1}}:b") == 0
        assert await redis.get(outside) == b"3"
        await redis.delete(outside)
        connection = await aio_pika.connect(scratch.rabbitmq_url, timeout=10)
        async with connection:
            names = TopologyNames.from_settings(scratch)
            for queue in names.queues:
                channel = await connection.channel()
                with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
                    await channel.declare_queue(queue, passive=True)
            for exchange in names.exchanges:
                channel = await connection.channel()
                with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
                    await channel.declare_exchange(exchange, passive=True)


async def _database_exists(settings: Settings) -> bool:
    conn = await connect_raw(settings, database="postgres", timeouts=False)
    try:
        found = await conn.fetchval(
            "SELECT 1 FROM pg_database WHERE datname = $1", settings.POSTGRES_DB
        )
        return found is not None
    finally:
        await conn.close()


def test_clean_refuses_production(settings: Settings) -> None:
    result = _cli(settings, "clean", "--yes", APP_ENV="production", JWT_SECRET_KEY="s" * 48)
    assert result.returncode == 1
    assert result.stderr.strip() == "clean: clean refuses to run with APP_ENV=production"
