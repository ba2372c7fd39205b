"""Auto-pipelining on redis-py: the calls of one event-loop pass leave in one pipeline.

Every request runs the token-bucket script and every write a generation bump. Sent one
by one, each costs a pool checkout and a round trip of its own; here the calls made in
one pass of the event loop are queued and sent together through the client's own
non-transactional pipeline (`Redis.pipeline()` or `RedisCluster.pipeline()`, which
groups them by node and follows MOVED/ASK). No protocol or slot logic of ours: only the
batching.

Each pipeline, script reloads included, is bounded by REDIS_SOCKET_TIMEOUT: a hung
Redis fails it (and every call queued behind it) with `TimeoutError`, an outage.
Arguments (not the command name) are encoded to bytes here, once, so redis-py's packer
passes them through.

Scripts run by SHA. A NOSCRIPT reply (a restarted node, a promoted replica) loads the
script (on every primary of a cluster) and runs those calls once more. Each caller gets
its own reply or its own error; a failed pipeline fails every call in it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.asyncio import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from api.redis_core.client import RedisClient

Arg = str | bytes | int | float

# More calls than this in one pass go out as several pipelines, side by side.
MAX_BATCH = 512
# The slot map redis-py's cluster client fetches on first use and after a failover may
# take longer than one batch's bound on a busy host; it gets a bound of its own instead
# of failing the first requests into the fallback.
SLOT_MAP_TIMEOUT = 2.0
# Pipelines in flight at once (each holds a pooled connection per node it reaches);
# calls made meanwhile wait and leave together when one returns, so a busy process
# batches more instead of exhausting the pool.
MAX_IN_FLIGHT = 16


# The command name stays a str: the cluster pipeline looks its routing policy up by it.
_EVALSHA = "EVALSHA"


def _encode(value: Arg) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bool):
        raise TypeError("a bool is not a Redis argument")
    return repr(value).encode()


class _Call:
    __slots__ = ("args", "future", "script")

    def __init__(
        self, future: asyncio.Future[Any], args: tuple[Arg, ...], script: AsyncScript | None
    ) -> None:
        self.future = future
        self.args = args
        self.script = script


class AutoPipeline:
    """Queue calls; send each pass's calls as one pipeline on the kept client."""

    def __init__(self, client: RedisClient, *, timeout: float) -> None:
        self.client = client
        self._timeout = timeout
        self._queue: list[_Call] = []
        self._running: set[asyncio.Task[None]] = set()
        self._scheduled = False
        self._closed = False

    def register_script(self, source: str) -> AsyncScript:
        """A script object (its SHA computed once) to pass to `evalsha`."""
        return self.client.register_script(source)

    def evalsha(self, script: AsyncScript, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """Run `script` on `keys` (one hash slot) with `args`; awaitable reply."""
        params = (script.sha, len(keys), *keys, *args)
        return self._enqueue((_EVALSHA, *map(_encode, params)), script)

    def execute(self, command: str, *args: Arg) -> Any:
        """Any single-slot command, e.g. `execute("SET", key, value, "EX", 60)`."""
        return self._enqueue((command, *map(_encode, args)), None)

    def _enqueue(self, args: tuple[Arg, ...], script: AsyncScript | None) -> asyncio.Future[Any]:
        if self._closed:
            raise RuntimeError("the Redis pipeline is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append(_Call(future, args, script))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._scheduled = False
        while self._queue and len(self._running) < MAX_IN_FLIGHT:
            batch = self._queue[:MAX_BATCH]
            del self._queue[:MAX_BATCH]
            task = asyncio.create_task(self._send(batch))
            self._running.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if self._queue and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    async def _send(self, calls: list[_Call]) -> None:
        try:
            if isinstance(self.client, RedisCluster):
                async with asyncio.timeout(max(self._timeout, SLOT_MAP_TIMEOUT)):
                    await self.client.initialize()  # returns at once when the map is known
            async with asyncio.timeout(self._timeout):
                results = await self._run(calls)
                missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
                if missing:
                    results = await self._reload_and_rerun(calls, results, missing)
        except BaseException as exc:
            # The whole pipeline failed (no connection, no answer in time): the calls
            # queued behind it would meet the same Redis, so they fail now too.
            failed, self._queue = [*calls, *self._queue], []
            for call in failed:
                if not call.future.done():
                    call.future.set_exception(exc)
                    # Retrieved by its caller, which reports it; one that stopped
                    # waiting (its request ended) must not log it as never retrieved.
                    call.future.exception()
            if not isinstance(exc, Exception):
                raise
            return
        for call, result in zip(calls, results, strict=True):
            if call.future.done():  # its caller gave up (cancelled)
                continue
            if isinstance(result, BaseException):
                call.future.set_exception(result)
                call.future.exception()
            else:
                call.future.set_result(result)

    async def _run(self, calls: list[_Call]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for call in calls:
            pipe.execute_command(*call.args)
        return list(await pipe.execute(raise_on_error=False))

    async def _reload_and_rerun(
        self, calls: list[_Call], results: list[Any], missing: list[int]
    ) -> list[Any]:
        # On every primary of a cluster (redis-py sends SCRIPT LOAD to all of them).
        for script in {id(calls[i].script): calls[i].script for i in missing}.values():
            if script is not None:
                await self.client.script_load(script.script)
        again = await self._run([calls[i] for i in missing])
        results = list(results)
        for index, result in zip(missing, again, strict=True):
            results[index] = result
        return results

    async def close(self) -> None:
        """Refuse new calls; let the pipelines already sent finish."""
        self._closed = True
        while self._queue or self._running:
            self._flush()
            await asyncio.gather(*self._running, return_exceptions=True)
