"""Reconnect with capped, jittered backoff: the one retry loop of every broker and LISTEN client.

A *session* connects, works until its connection is lost and then returns (or raises if
it could not get going). `reconnect_forever` runs sessions back to back: after a session
that returns it starts the next one at once (a node went away: the next node is tried
now, not after a pause), after one that raises it backs off. One warning per outage,
one info line when it is over; a `fatal` exception (a misconfiguration, not an outage)
ends the loop instead of being retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable

INITIAL_DELAY = 0.5
MAX_DELAY = 5.0
# A session shorter than this that ended "normally" still counts for a pause.
MIN_SESSION_SECONDS = 1.0


class Backoff:
    """Capped exponential delays with ±20 % jitter, so many clients do not retry in lockstep."""

    def __init__(self, initial: float = INITIAL_DELAY, cap: float = MAX_DELAY) -> None:
        self._initial = initial
        self._cap = cap
        self._next = initial

    def next(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self._cap)
        return delay * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self._next = self._initial

    async def sleep(self, stop: asyncio.Event | None = None) -> bool:
        """Sleep the next delay, or until `stop` is set; whether it was set."""
        delay = self.next()
        if stop is None:
            await asyncio.sleep(delay)
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        return stop.is_set()


async def reconnect_forever(
    session: Callable[[], Awaitable[None]],
    *,
    name: str,
    logger: logging.Logger,
    stop: asyncio.Event,
    backoff: Backoff | None = None,
    fatal: tuple[type[BaseException], ...] = (),
) -> None:
    """Run `session` until `stop` is set; back off only after a session that failed.

    A `fatal` exception propagates (after it is logged by whoever raised it); any other
    failure is an outage: logged once as a warning with the error's type, then at debug.
    """
    backoff = backoff or Backoff()
    loop = asyncio.get_running_loop()
    failing = False
    while not stop.is_set():
        started = loop.time()
        try:
            await session()
        except fatal:
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # an outage: the peer is down, unreachable or went away
            # The type only: a library's message may quote a URL with its password.
            extra = {"error": type(exc).__name__}
            if not failing:
                logger.warning(f"{name} unavailable, retrying", extra=extra)
            else:
                logger.debug(f"{name} still unavailable", extra=extra)
            failing = True
            await backoff.sleep(stop)
            continue
        if failing:
            logger.info(f"{name} available again")
        failing = False
        backoff.reset()
        if loop.time() - started < MIN_SESSION_SECONDS:
            # Connected and dropped at once (a node shutting down): do not spin on it.
            await backoff.sleep(stop)
