"""Every revision upgrades and downgrades, and the models and the migrated schema agree."""

from __future__ import annotations

import asyncio

from alembic import command
from alembic.util.exc import CommandError

from tests.conftest import RUN_ID, _admin_connection, _alembic_config, run_settings


async def test_upgrade_downgrade_upgrade_then_no_drift() -> None:
    # A database of its own: the session's database stays at head for the other tests.
    settings = run_settings(POSTGRES_DB=f"orders_test_{RUN_ID}_migrations")
    config = _alembic_config(settings)
    admin = await _admin_connection(settings)
    try:
        await admin.execute(f'CREATE DATABASE "{settings.POSTGRES_DB}"')
        # env.py runs its own event loop, so Alembic runs in a thread.
        await asyncio.to_thread(command.upgrade, config, "head")
        await asyncio.to_thread(command.downgrade, config, "base")
        await asyncio.to_thread(command.upgrade, config, "head")
        try:
            await asyncio.to_thread(command.check, config)
        except CommandError as drift:  # the message lists what autogenerate would add
            raise AssertionError(f"models and migrations differ: {drift}") from None
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{settings.POSTGRES_DB}" WITH (FORCE)')
        await admin.close()
