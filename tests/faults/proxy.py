"""A TCP fault proxy on 127.0.0.1: put it between the service and a dependency, then misbehave.

Modes, switchable at any time and applied to open connections as well as new ones:

- `pass`: bytes flow both ways untouched;
- `latency`: every chunk is delivered `latency` seconds late (order kept);
- `blackhole`: a hung peer: connections are accepted, nothing is delivered either way;
- `reset`: every connection is torn down with a TCP RST, new ones as soon as they arrive.

Leaving `blackhole` resets the connections it swallowed bytes on (their streams are
corrupt), like a hung host that is rebooted.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import StrEnum

CHUNK = 65_536


class Mode(StrEnum):
    PASS = "pass"
    LATENCY = "latency"
    BLACKHOLE = "blackhole"
    RESET = "reset"


def abort_with_rst(writer: asyncio.StreamWriter) -> None:
    """Close at once with a TCP RST (SO_LINGER 0), as a crashed peer's kernel would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)
class _Link:
    """One proxied connection: the client side, and the upstream side once opened."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    swallowed: bool = False
    open_directions: int = 2
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                abort_with_rst(writer)
        for task in self.tasks:
            task.cancel()


class FaultProxy:
    """Forwards 127.0.0.1:<port> to 127.0.0.1:<target_port>, misbehaving on request."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.mode = Mode.PASS
        self.latency = 0.0
        self.connections_seen = 0
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def upstream_ports(self) -> set[int]:
        """Local ports of our connections to the target (pg_stat_activity.client_port)."""
        ports: set[int] = set()
        for link in self._links:
            if link.upstream is not None and (name := link.upstream.get_extra_info("sockname")):
                ports.add(name[1])
        return ports

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)

    def set_mode(self, mode: Mode, *, latency: float = 0.0) -> None:
        """Switch behaviour now, for open connections and new ones."""
        leaving_blackhole = self.mode is Mode.BLACKHOLE and mode is not Mode.BLACKHOLE
        self.mode, self.latency = mode, latency
        for link in list(self._links):
            if mode is Mode.RESET or (leaving_blackhole and link.swallowed):
                self._drop(link)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            self._drop(link)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def _drop(self, link: _Link) -> None:
        link.abort()
        self._links.discard(link)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_seen += 1
        link = _Link(client=writer)
        self._links.add(link)
        if self.mode is Mode.RESET:
            self._drop(link)
            return
        if self.mode is Mode.BLACKHOLE:
            # A hung peer: the handshake completes, then silence.
            link.swallowed = True
            link.tasks.append(asyncio.create_task(self._swallow(reader)))
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.target_port), 5
            )
        except (OSError, TimeoutError):
            self._drop(link)
            return
        link.upstream = up_writer
        link.tasks += [
            asyncio.create_task(self._pump(reader, up_writer, link)),
            asyncio.create_task(self._pump(up_reader, writer, link)),
        ]

    @staticmethod
    async def _swallow(reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            while await reader.read(CHUNK):
                pass

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link
    ) -> None:
        """Copy one direction; delays keep their order through a queue of due times."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        deliver = asyncio.create_task(self._deliver(queue, writer))
        try:
            while data := await reader.read(CHUNK):
                if self.mode is Mode.BLACKHOLE:
                    link.swallowed = True
                    continue
                due = loop.time() + (self.latency if self.mode is Mode.LATENCY else 0.0)
                queue.put_nowait((due, data))
            queue.put_nowait((loop.time(), b""))  # end of stream: half-close after the rest
            await deliver
        except OSError:
            self._drop(link)
        finally:
            deliver.cancel()
            link.open_directions -= 1
            if link.open_directions == 0:  # both ways ended cleanly: forget the link
                self._links.discard(link)
                for side in (link.client, link.upstream):
                    if side is not None:
                        side.close()

    @staticmethod
    async def _deliver(
        queue: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await queue.get()
            await asyncio.sleep(max(0.0, due - loop.time()))
            if not data:
                with contextlib.suppress(OSError):
                    if writer.can_write_eof():
                        writer.write_eof()
                return
            writer.write(data)
            await writer.drain()


@contextlib.asynccontextmanager
async def fault_proxy(target_port: int) -> AsyncIterator[FaultProxy]:
    """A started proxy to `target_port`, closed (every connection reset) on exit."""
    proxy = FaultProxy(target_port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()
