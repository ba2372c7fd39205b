"""One RabbitMQ connection per process, to any node of the cluster, kept in the background.

The API must start and serve while RabbitMQ is down, so `start()` never waits for
the broker. A task connects to the nodes of `RMQ_HOSTS` in turn (one plain
aio-pika connection at a time: the robust connection only ever retries its one
URL), declares the topology on the node it reached and holds the connection until
it is lost; then it moves on to the next node at once. Whoever uses the connection
(publisher, RPC client, status consumer) waits for `wait_connected()` and opens its
channels again on the new connection.

A declaration that fails closes its connection (nothing leaks). A queue that exists
with other arguments is a misconfiguration, not an outage: it is logged once as an
error naming the queue and the difference, the client stops trying and reports it
through `misconfiguration` (readiness `fail`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from enum import Enum, auto

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection

from api.configs import Settings
from api.helpers.backoff import reconnect_forever
from api.rabbit_core.topology import TopologyMismatch, TopologyNames, declare_topology

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0

# What is declared on every node the client connects to (the whole topology by default).
Declare = Callable[[AbstractChannel, TopologyNames], Awaitable[object]]
# Bounds closing a connection whose node may have vanished.
CLOSE_TIMEOUT = 2.0


class Lifecycle(Enum):
    """Where a long-lived AMQP object is: started once, closed once."""

    NEW = auto()
    STARTED = auto()
    CLOSED = auto()


class RabbitUnavailable(ConnectionError):
    """RabbitMQ is not connected (yet, or any more)."""


class RabbitMisconfigured(RabbitUnavailable):
    """The broker refused the topology; retrying cannot help (its text says why)."""


class RabbitClient:
    """Owns the connection to one node at a time; hands it out while it is up."""

    def __init__(
        self,
        settings: Settings,
        *,
        name: str = "orders-api",
        declare: Declare = declare_topology,
    ) -> None:
        self._settings = settings
        self._declare = declare
        self._nodes = settings.rabbitmq_nodes
        self._next_node = 0
        self._name = name
        self.names = TopologyNames.from_settings(settings)
        self._state = Lifecycle.NEW
        self._connection: AbstractConnection | None = None
        self._connected = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # `host:port` of the node connected to now, for logs and readiness.
        self.node: str | None = None
        # Set once the broker refused the topology; the client then stays disconnected.
        self.misconfiguration: str | None = None

    async def start(self) -> None:
        if self._state is not Lifecycle.NEW:
            raise RuntimeError("RabbitClient.start() may be called once")
        self._state = Lifecycle.STARTED
        self._task = asyncio.create_task(self._run(), name="rabbitmq-connect")

    async def _run(self) -> None:
        try:
            await reconnect_forever(
                self._session,
                name="rabbitmq",
                logger=logger,
                stop=self._stop,
                fatal=(TopologyMismatch,),
            )
        except TopologyMismatch as exc:
            self.misconfiguration = str(exc)
            logger.error(
                "rabbitmq topology refused, not retrying: fix the queue or RMQ_QUEUE_TYPE, "
                "then restart",
                extra={"error": self.misconfiguration},
            )

    async def _connect_any(self) -> tuple[AbstractConnection, str]:
        """A connection to the first node that answers, starting after the last one used."""
        last_error: BaseException | None = None
        for attempt in range(len(self._nodes)):
            index = (self._next_node + attempt) % len(self._nodes)
            host, port = self._nodes[index]
            try:
                connection = await aio_pika.connect(
                    self._settings.rabbitmq_node_url(host, port),
                    timeout=CONNECT_TIMEOUT,
                    client_properties={"connection_name": self._name},
                )
            except Exception as exc:  # this node is down or unreachable: try the next one
                logger.debug(
                    "rabbitmq node unavailable",
                    extra={"node": f"{host}:{port}", "error": type(exc).__name__},
                )
                last_error = exc
                continue
            self._next_node = index
            return connection, f"{host}:{port}"
        assert last_error is not None
        raise last_error

    async def _session(self) -> None:
        """Connect, declare the topology, hold the connection until it is lost."""
        connection, node = await self._connect_any()
        try:
            channel = await connection.channel()
            await self._declare(channel, self.names)
            await channel.close()
        except BaseException as exc:
            await _close_quietly(connection)
            if not isinstance(exc, TopologyMismatch):
                # This node could not take the declaration (in a minority, shutting
                # down): the next attempt starts at another node.
                self._next_node = (self._next_node + 1) % len(self._nodes)
            raise
        self._connection, self.node = connection, node
        self._connected.set()
        logger.info("rabbitmq connected", extra={"node": node})
        try:
            await until_closed(self._stop, connection)
        finally:
            self._connected.clear()
            self._connection = self.node = None
            if not self._stop.is_set():
                logger.warning(
                    "rabbitmq connection lost, trying the next node", extra={"node": node}
                )
                # The next session starts at the node after this one.
                self._next_node = (self._next_node + 1) % len(self._nodes)
            await _close_quietly(connection)

    @property
    def is_connected(self) -> bool:
        connection = self._connection
        return connection is not None and not connection.is_closed and self._connected.is_set()

    @property
    def connection(self) -> AbstractConnection:
        if self._state is Lifecycle.CLOSED:
            raise RuntimeError("RabbitClient is closed")
        connection = self._connection
        if connection is None or not self._connected.is_set():
            if self.misconfiguration is not None:
                raise RabbitMisconfigured(self.misconfiguration)
            raise RabbitUnavailable("RabbitMQ is not connected")
        return connection

    async def wait_connected(self, timeout: float | None = None) -> AbstractConnection:
        """The connection, waiting up to `timeout` seconds for one."""
        if self._state is Lifecycle.CLOSED:
            raise RuntimeError("RabbitClient is closed")
        if self.misconfiguration is not None:
            raise RabbitMisconfigured(self.misconfiguration)
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            raise RabbitUnavailable("RabbitMQ is not connected") from None
        return self.connection

    async def channel(self, *, publisher_confirms: bool = True) -> AbstractChannel:
        return await self.connection.channel(publisher_confirms=publisher_confirms)

    async def close(self) -> None:
        if self._state is Lifecycle.CLOSED:
            return
        self._state = Lifecycle.CLOSED
        self._stop.set()
        if self._task is not None:
            if self._connected.is_set():
                # The session closes its connection itself once it sees the stop.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._task), CLOSE_TIMEOUT + 0.5)
            if not self._task.done():
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task


async def until_closed(
    stop: asyncio.Event, *closables: AbstractConnection | AbstractChannel
) -> None:
    """Return once any of `closables` is closed (or lost), or `stop` is set."""
    if any(closable.is_closed for closable in closables):
        return
    closed = asyncio.Event()

    def on_close(*_: object) -> None:
        closed.set()

    for closable in closables:
        closable.close_callbacks.add(on_close)
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(closed.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
        for closable in closables:
            closable.close_callbacks.discard(on_close)


async def _close_quietly(connection: AbstractConnection) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(connection.close(), CLOSE_TIMEOUT)
