"""A dedicated PostgreSQL connection that LISTENs for new outbox rows.

The outbox insert trigger runs `pg_notify('orders_outbox', '')`, delivered when the
writing transaction commits. The connection is reopened whenever it drops (a
PostgreSQL restart, a failover, a network cut); while it is down the relay still polls.
It goes to the primary directly: POSTGRES_LISTEN_HOST, else the first writable node of
POSTGRES_HOSTS, or, behind PgBouncer (whose transaction pooling cannot carry a
LISTEN), the address of the server PgBouncer itself writes to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Callable
from typing import Any

from api.configs import HostPort, Settings
from api.database.connection import connect_raw
from api.database.query.server import ping_raw, server_address
from api.helpers.backoff import Backoff, reconnect_forever
from api.metrics import OUTBOX_LISTEN_FAILURES

logger = logging.getLogger(__name__)

# The started listeners of this process, for `listen_state`.
_RUNNING: weakref.WeakSet[OutboxNotifications] = weakref.WeakSet()

CHANNEL = "orders_outbox"
LISTEN_APPLICATION_NAME = "orders-api-relay-listen"
# How often an idle LISTEN connection is checked; a half-open socket is noticed this late.
HEALTH_CHECK_INTERVAL = 15.0
MAX_RECONNECT_DELAY = 10.0


def listen_state() -> str | None:
    """`listening`, or `polling` while a relay of this process has no LISTEN connection.

    None when this process runs no relay. Shown in `/ping/ready`.
    """
    running = [listener for listener in _RUNNING if listener._task is not None]
    if not running:
        return None
    return "listening" if all(listener.connected for listener in running) else "polling"


class OutboxNotifications:
    """Calls `on_notify` for every NOTIFY on the outbox channel, and once after each (re)connect."""

    def __init__(self, settings: Settings, on_notify: Callable[[], None]) -> None:
        self._settings = settings
        self._on_notify = on_notify
        self._task: asyncio.Task[None] | None = None
        self.connected = False

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen_forever(), name="outbox-listen")
        _RUNNING.add(self)

    async def close(self) -> None:
        _RUNNING.discard(self)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _connect(self) -> Any:
        settings = self._settings
        hosts = settings.postgres_listen_hosts
        if not hosts and settings.behind_pgbouncer:
            hosts = [await self._primary_behind_pooler()]
        return await connect_raw(
            settings,
            hosts=hosts or None,
            application_name=LISTEN_APPLICATION_NAME,
            pooled=False,
            timeouts=False,
        )

    async def _primary_behind_pooler(self) -> HostPort:
        """The address of the PostgreSQL server PgBouncer connects this service to."""
        conn = await connect_raw(self._settings)
        try:
            address = await server_address(conn)
        finally:
            await conn.close()
        if address is None:
            raise ConnectionError("PgBouncer reaches PostgreSQL over a Unix socket")
        return HostPort(*address)

    async def _listen_forever(self) -> None:
        # Never stopped from inside: `close()` cancels the task.
        await reconnect_forever(
            self._listen_counted,
            name="outbox listen connection (polling meanwhile)",
            logger=logger,
            stop=asyncio.Event(),
            backoff=Backoff(cap=MAX_RECONNECT_DELAY),
        )

    async def _listen_counted(self) -> None:
        try:
            await self._listen_once()
        except Exception:
            OUTBOX_LISTEN_FAILURES.inc()
            raise

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
                    await ping_raw(connection, timeout=self._settings.POSTGRES_CONNECT_TIMEOUT)
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
