"""One robust RabbitMQ connection per process, opened in the background.

The API must start and serve while RabbitMQ is down, so `start()` never waits for
the broker: a task keeps trying with capped, jittered backoff. Once connected,
aio-pika's robust connection reconnects by itself and restores its channels,
exchanges, queues and consumers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from enum import Enum, auto

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from api.configs import Settings
from api.rabbit_core.topology import Topology, TopologyNames, declare_topology

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
MAX_BACKOFF = 10.0


class _State(Enum):
    NEW = auto()
    STARTED = auto()
    CLOSED = auto()


class RabbitUnavailable(ConnectionError):
    """RabbitMQ is not connected (yet, or any more)."""


class RabbitClient:
    """Owns the connection; hands out channels once it is up."""

    def __init__(self, settings: Settings) -> None:
        self._url = settings.rabbitmq_url
        self.names = TopologyNames.from_settings(settings)
        self._state = _State.NEW
        self._connection: AbstractRobustConnection | None = None
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.topology: Topology | None = None

    async def start(self) -> None:
        if self._state is not _State.NEW:
            raise RuntimeError("RabbitClient.start() may be called once")
        self._state = _State.STARTED
        self._task = asyncio.create_task(self._connect_forever(), name="rabbitmq-connect")

    async def _connect_forever(self) -> None:
        delay = 0.5
        while self._state is _State.STARTED:
            try:
                connection = await aio_pika.connect_robust(
                    self._url,
                    timeout=CONNECT_TIMEOUT,
                    client_properties={"connection_name": "orders-api"},
                )
                channel = await connection.channel()
                self.topology = await declare_topology(channel, self.names)
            except Exception as exc:  # any failure to reach the broker: keep trying
                logger.warning(
                    "rabbitmq unavailable, retrying",
                    extra={"error": type(exc).__name__, "retry_in_s": round(delay, 2)},
                )
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, MAX_BACKOFF)
                continue
            self._connection = connection
            self._connected.set()
            logger.info("rabbitmq connected")
            return

    @property
    def is_connected(self) -> bool:
        """Connected now: a robust connection that lost the broker is not closed, only
        reconnecting, so its `connected` event is what tells."""
        connection = self._connection
        return (
            connection is not None
            and not connection.is_closed
            and connection.connected.is_set()
            and self._connected.is_set()
        )

    @property
    def connection(self) -> AbstractRobustConnection:
        if self._state is _State.CLOSED:
            raise RuntimeError("RabbitClient is closed")
        if self._connection is None:
            raise RabbitUnavailable("RabbitMQ is not connected")
        return self._connection

    async def wait_connected(self, timeout: float | None = None) -> AbstractRobustConnection:
        """The connection, waiting up to `timeout` seconds for the first connect."""
        if self._state is _State.CLOSED:
            raise RuntimeError("RabbitClient is closed")
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            raise RabbitUnavailable("RabbitMQ is not connected") from None
        return self.connection

    async def channel(self, *, publisher_confirms: bool = True) -> AbstractChannel:
        return await self.connection.channel(publisher_confirms=publisher_confirms)

    async def close(self) -> None:
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
