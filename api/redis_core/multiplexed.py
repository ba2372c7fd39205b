"""One pipelined Redis connection per process for the scripts every request runs.

redis-py's pooled client spends about 50 µs of CPU on a call (pool checkout and
release under a lock, the retry wrapper, a stream read per reply): a quarter of a
cached read's whole cost. The rate limiter's script runs on every request and the
cache's generation bump on every write, so those calls share one connection here.
A command is written as soon as it is made; Redis answers in order, so each reply
resolves the oldest waiting caller, and under load one read brings many replies.

Failures look like redis-py's (`ConnectionError`, `TimeoutError`, `ResponseError`),
so the callers' circuit handling is the same for both clients. A reply that does not
come within the socket timeout closes the connection (a hung Redis fails every
caller waiting on it, within 1.25 timeouts); the next call connects again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import deque
from collections.abc import Sequence
from typing import Any, cast

import hiredis
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    NoScriptError,
    ResponseError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)

from api.configs import Settings

Arg = str | bytes | int | float


def _encode(value: Arg) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return repr(value).encode()


def pack_command(args: Sequence[Arg]) -> bytes:
    """A command in RESP: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = _encode(arg)
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _ReplyProtocol(asyncio.Protocol):
    """Writes commands, parses replies and hands each to the oldest waiting future.

    Commands made in one pass of the event loop leave in one write; each waiter keeps
    the loop time by which its reply is due, for the connection's watchdog.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._reader = hiredis.Reader()
        self._outgoing: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport implements asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def send(self, command: bytes, timeout: float) -> asyncio.Future[Any]:
        """Queue `command`; its reply (or error) resolves the returned future."""
        if self.transport is None:
            raise RedisConnectionError("connection to Redis lost")
        future: asyncio.Future[Any] = self._loop.create_future()
        self.waiting.append((future, self._loop.time() + timeout))
        if not self._outgoing:
            self._loop.call_soon(self._flush)
        self._outgoing.append(command)
        return future

    def _flush(self) -> None:
        data = b"".join(self._outgoing)
        self._outgoing.clear()
        if self.transport is not None:
            self.transport.write(data)

    def overdue(self) -> bool:
        """Whether the oldest waiter's reply is past due (replies come in order)."""
        return bool(self.waiting) and self.waiting[0][1] < self._loop.time()

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        try:
            self._hand_out_replies()
        except hiredis.ProtocolError:  # not RESP: nothing after this can be trusted
            self.fail(RedisConnectionError("Redis sent a malformed reply"))

    def _hand_out_replies(self) -> None:
        while (reply := self._reader.gets()) is not False:
            if not self.waiting:  # a reply nobody asked for: the stream is out of step
                self.fail(RedisConnectionError("unexpected reply from Redis"))
                return
            future, _ = self.waiting.popleft()
            if future.done():  # its caller gave up (cancelled); the order still holds
                continue
            if isinstance(reply, hiredis.ReplyError):
                message = str(reply)
                error = NoScriptError if message.startswith("NOSCRIPT") else ResponseError
                future.set_exception(error(message))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._fail_waiting(RedisConnectionError("connection to Redis lost"))

    def fail(self, error: Exception) -> None:
        """Close the connection; every waiting caller gets `error`."""
        transport, self.transport = self.transport, None
        self._outgoing.clear()
        self._fail_waiting(error)
        if transport is not None:
            transport.abort()

    def _fail_waiting(self, error: Exception) -> None:
        while self.waiting:
            future, _ = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: its caller may have gone


class MultiplexedRedis:
    """Commands from every task of the process, pipelined over one connection."""

    def __init__(self, settings: Settings) -> None:
        self._host = settings.REDIS_HOST
        self._port = settings.REDIS_PORT
        self._timeout = settings.REDIS_SOCKET_TIMEOUT
        self._setup: list[list[Arg]] = []
        if settings.REDIS_USER:
            password = settings.REDIS_USER_PASSWORD.get_secret_value()
            self._setup.append(["AUTH", settings.REDIS_USER, password])
        elif password := settings.REDIS_PASSWORD.get_secret_value():
            self._setup.append(["AUTH", password])
        self._setup.append(["SELECT", settings.REDIS_DB])
        self._setup.append(["CLIENT", "SETNAME", "orders-api-mux"])
        self._protocol: _ReplyProtocol | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._connecting = asyncio.Lock()

    async def execute(self, *args: Arg) -> Any:
        """Send one command and wait for its reply (at most REDIS_SOCKET_TIMEOUT)."""
        protocol = self._protocol
        if protocol is None or protocol.transport is None:
            protocol = await self._connect()
        return await protocol.send(pack_command(args), self._timeout)

    async def _watch(self, protocol: _ReplyProtocol) -> None:
        """Fail the connection when a reply is overdue: Redis hangs, every waiter learns it.

        One task per connection instead of a timer per call; a waiter hears of a hung
        Redis between one and 1.25 socket timeouts after it asked.
        """
        while protocol.transport is not None:
            await asyncio.sleep(self._timeout / 4)
            if protocol.overdue():
                protocol.fail(RedisTimeoutError("Redis did not answer in time"))

    async def _connect(self) -> _ReplyProtocol:
        async with self._connecting:
            if self._protocol is not None and self._protocol.transport is not None:
                return self._protocol
            loop = asyncio.get_running_loop()
            protocol: _ReplyProtocol | None = None
            try:
                # Connecting and the setup commands, within one socket timeout.
                async with asyncio.timeout(self._timeout):
                    _, protocol = await loop.create_connection(
                        _ReplyProtocol, self._host, self._port
                    )
                    for command in self._setup:
                        await protocol.send(pack_command(command), self._timeout)
            except BaseException as exc:
                if protocol is not None:
                    protocol.fail(RedisConnectionError("Redis connection setup failed"))
                if isinstance(exc, OSError | TimeoutError):
                    raise RedisConnectionError(f"cannot connect to Redis: {exc!r}") from None
                raise
            self._protocol = protocol
            self._watchdog = asyncio.create_task(self._watch(protocol), name="redis-mux-watchdog")
            return protocol

    def register_script(self, script: str) -> MultiplexedScript:
        return MultiplexedScript(self, script)

    async def close(self) -> None:
        if self._protocol is not None:
            self._protocol.fail(RedisConnectionError("client closed"))
            self._protocol = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None


class MultiplexedScript:
    """A Lua script run by EVALSHA, sent in full (EVAL) when Redis does not know it."""

    def __init__(self, client: MultiplexedRedis, script: str) -> None:
        self._client = client
        self._script = script
        self._sha = hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()

    async def __call__(self, keys: Sequence[Arg] = (), args: Sequence[Arg] = ()) -> Any:
        try:
            return await self._client.execute("EVALSHA", self._sha, len(keys), *keys, *args)
        except NoScriptError:
            # Redis restarted or ran SCRIPT FLUSH: EVAL loads it again for the next call.
            return await self._client.execute("EVAL", self._script, len(keys), *keys, *args)
