"""A dedicated PostgreSQL connection that LISTENs for new outbox rows.

The outbox insert trigger runs `pg_notify('orders_outbox', '')`, delivered when the
writing transaction commits. The connection is reopened whenever it drops (a
PostgreSQL restart, a network cut); while it is down the relay still polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import asyncpg

from api.configs import Settings
from api.helpers.backoff import Backoff, reconnect_forever

logger = logging.getLogger(__name__)

CHANNEL = "orders_outbox"
LISTEN_APPLICATION_NAME = "orders-api-relay-listen"
# How often an idle LISTEN connection is checked; a half-open socket is noticed this late.
HEALTH_CHECK_INTERVAL = 15.0
MAX_RECONNECT_DELAY = 10.0


class OutboxNotifications:
    """Calls `on_notify` for every NOTIFY on the outbox channel, and once after each (re)connect."""

    def __init__(self, settings: Settings, on_notify: Callable[[], None]) -> None:
        self._settings = settings
        self._on_notify = on_notify
        self._task: asyncio.Task[None] | None = None
        self.connected = False

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen_forever(), name="outbox-listen")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _connect(self) -> Any:
        settings = self._settings
        return await asyncpg.connect(
            host=settings.POSTGRES_HOST,
            port=settings.POSTGRES_PORT,
            user=settings.POSTGRES_USER,
            password=settings.POSTGRES_PASSWORD.get_secret_value() or None,
            database=settings.POSTGRES_DB,
            timeout=settings.POSTGRES_CONNECT_TIMEOUT,
            server_settings={"application_name": LISTEN_APPLICATION_NAME},
        )

    async def _listen_forever(self) -> None:
        # Never stopped from inside: `close()` cancels the task.
        await reconnect_forever(
            self._listen_once,
            name="outbox listen connection (polling meanwhile)",
            logger=logger,
            stop=asyncio.Event(),
            backoff=Backoff(cap=MAX_RECONNECT_DELAY),
        )

    async def _listen_once(self) -> None:
        """LISTEN until the connection drops; returns or raises when it does."""
        connection = await self._connect()
        lost = asyncio.Event()
        connection.add_termination_listener(lambda _conn: lost.set())
        try:
            await connection.add_listener(CHANNEL, self._notified)
            self.connected = True
            # Rows committed while we were not listening would otherwise wait for a poll.
            self._on_notify()
            while not connection.is_closed():
                try:
                    await asyncio.wait_for(lost.wait(), HEALTH_CHECK_INTERVAL)
                except TimeoutError:
                    timeout = self._settings.POSTGRES_CONNECT_TIMEOUT
                    await connection.execute("SELECT 1", timeout=timeout)
                else:
                    return
        finally:
            self.connected = False
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), timeout=1.0)
            if not connection.is_closed():
                connection.terminate()

    def _notified(self, *_args: object) -> None:
        self._on_notify()
