"""Alembic environment: async engine, URL from api.configs (never alembic.ini)."""

from __future__ import annotations

import asyncio
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from api.configs import load_settings
from api.database.connection import create_engine
from api.models import Base

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def run_migrations_offline() -> None:
    url = config.attributes.get("url") or load_settings().postgres_url().render_as_string(
        hide_password=False
    )
    context.configure(url=str(url), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
    with context.begin_transaction():
        # A role-level statement_timeout (the PgBouncer set-up) must not cut an index build.
        connection.exec_driver_sql("SET LOCAL statement_timeout = 0")
        context.run_migrations()


def _engine() -> AsyncEngine:
    # Tests may pass their own database through `config.attributes`.
    url = config.attributes.get("url")
    if url is not None:
        return create_async_engine(str(url), poolclass=NullPool)
    # The service's own connections (the primary of POSTGRES_HOSTS, PgBouncer-safe), but
    # without the request timeout: an index build may take longer.
    return create_engine(load_settings(), timeouts=False)


async def run_migrations_online() -> None:
    engine = _engine()
    async with engine.connect() as connection:
        await connection.run_sync(_run)
    await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_migrations_online())
