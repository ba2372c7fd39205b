"""`uv run python -m api.cli promote-admin EMAIL` against this run's database."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid

import httpx

from api.configs import Settings
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
