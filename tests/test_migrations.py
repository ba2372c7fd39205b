"""Every revision upgrades and downgrades, and the models and the migrated schema agree."""

from __future__ import annotations

import asyncio

from alembic import command
from alembic.util.exc import CommandError

from api.configs import Settings
from api.database.connection import connect_raw
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


async def test_the_outbox_is_vacuumed_after_a_few_thousand_sent_events(
    settings: Settings, database: str
) -> None:
    """The migrated outbox carries its own autovacuum thresholds (PostgreSQL's default
    waits for a fifth of the table to be dead; the relay's claims slow down meanwhile)."""
    admin = await connect_raw(settings, database=database, timeouts=False)
    try:
        options = await admin.fetchval("SELECT reloptions FROM pg_class WHERE relname = 'outbox'")
    finally:
        await admin.close()
    assert sorted(options) == [
        "autovacuum_analyze_scale_factor=0",
        "autovacuum_analyze_threshold=5000",
        "autovacuum_vacuum_scale_factor=0",
        "autovacuum_vacuum_threshold=5000",
    ]
