"""One circuit breaker per process for every Redis caller, and what counts as an outage.

Only an outage (no connection, a timeout, a closed connection, a cluster or a
Sentinel without a primary for the moment) opens the circuit: every caller then
skips Redis at once (memory buckets, cache BYPASS) instead of each waiting out its
own timeout, and a background probe closes it when Redis answers again, so no
request waits on a probe.

Anything else (CROSSSLOT, WRONGTYPE, READONLY, NOPERM, a refused password or
certificate, a redirection the client could not follow) is a fault, never an
outage: the request is still served as in an outage, but the fault is logged as an
error naming it, counted in `redis_errors_total{kind}`, and `/ping/ready` reports
redis `warn` with it while it lasts (until FAULT_HOLD_SECONDS pass without it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable

from redis.asyncio.sentinel import MasterNotFoundError
from redis.exceptions import (
    AskError,
    AuthenticationError,
    AuthorizationError,
    ClusterCrossSlotError,
    ClusterDownError,
    MovedError,
    NoPermissionError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from api.metrics import redis_errors

logger = logging.getLogger(__name__)

# After a failure, skip Redis this long before each probe.
REDIS_RETRY_PAUSE = 1.0
# A fault stays in `/ping/ready` this long after it was last seen.
FAULT_HOLD_SECONDS = 30.0
# At most one error line per fault kind this often (each occurrence is counted).
FAULT_LOG_INTERVAL = 10.0

# What a Redis call raises. RuntimeError too: under uvloop, a write to a connection the
# peer has reset fails with "unable to perform operation on <TCPTransport closed=True>",
# which redis-py passes through as it is.
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, RuntimeError)

# Outages: the service has no Redis for the moment (the node is down, hung, failing
# over). Authentication and authorisation errors subclass ConnectionError in redis-py
# but are configuration faults, so they are sorted out first.
_OUTAGES: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterDownError,
    TryAgainError,
    SlotNotCoveredError,
    MasterNotFoundError,
    OSError,
    RuntimeError,
)


# redis-py's own classes for replies whose text does not start with their name.
_NAMED_FAULTS: tuple[tuple[type[BaseException], str], ...] = (
    (MovedError, "MOVED"),
    (AskError, "ASK"),
    (ClusterCrossSlotError, "CROSSSLOT"),
    (NoPermissionError, "NOPERM"),
    (ReadOnlyError, "READONLY"),
)


def fault_kind(exc: BaseException) -> str | None:
    """None for an outage; else the fault's name (`WRONGTYPE`, `CROSSSLOT`, `AUTH`, `TLS`…)."""
    if isinstance(exc, AuthenticationError | AuthorizationError):
        return "AUTH"
    if _is_tls_failure(exc):
        return "TLS"
    if isinstance(exc, _OUTAGES):
        return None
    for error, name in _NAMED_FAULTS:
        if isinstance(exc, error):
            return name
    if isinstance(exc, ResponseError):
        word = str(exc).split(" ", 1)[0]
        if word.isupper() and word.isalpha():
            # redis-py prefixes pipelined errors with "Command # n (...) of pipeline".
            return word
        for known in ("CROSSSLOT", "WRONGTYPE", "NOPERM", "READONLY", "MOVED", "ASK", "NOSCRIPT"):
            if known in str(exc):
                return known
        return "ERR"
    if isinstance(exc, RedisClusterException):
        # Raised by the client before sending, e.g. keys of two slots in one command.
        return "CROSSSLOT" if "slot" in str(exc).lower() else "CLUSTER"
    return type(exc).__name__


def _is_tls_failure(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(
            seen
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def describe(exc: BaseException) -> str:
    """`Kind: message`, one line; Redis error texts carry no secrets."""
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class RedisCircuit:
    """Closed: use Redis. Open: skip it until a background probe answers."""

    def __init__(
        self, probe: Callable[[], Awaitable[object]], *, pause: float = REDIS_RETRY_PAUSE
    ) -> None:
        self._probe_call = probe
        self._pause = pause
        self._opened_at: float | None = None
        self._probe: asyncio.Task[None] | None = None
        self._fault: tuple[str, str, float] | None = None
        self._logged: dict[str, float] = {}

    def allow(self) -> bool:
        """Whether a caller may use Redis now."""
        return self._opened_at is None

    def succeeded(self) -> None:
        """Redis answered a caller: close the circuit."""
        self._opened_at = None

    def failed(self) -> bool:
        """Redis is away: open the circuit; True when this failure opened it."""
        opened = self._opened_at is None
        if opened:
            self._opened_at = time.monotonic()
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._probe_until_closed(), name="redis-probe")
        return opened

    def report(self, exc: BaseException, operation: str) -> bool:
        """Judge a failed call: True for an outage (circuit opened), False for a fault."""
        kind = fault_kind(exc)
        if kind is None:
            redis_errors("outage").inc()
            self.failed()
            return True
        self.fault(kind, f"{operation}: {describe(exc)}")
        if kind in ("AUTH", "TLS"):
            # Every connection would be refused the same way: skip Redis between probes
            # instead of paying a refused handshake per request.
            self.failed()
        return False

    def fault(self, kind: str, detail: str) -> None:
        """A non-outage error: counted, logged (at most once per interval), kept for readiness."""
        now = time.monotonic()
        redis_errors(kind).inc()
        self._fault = (kind, detail, now)
        if now - self._logged.get(kind, -FAULT_LOG_INTERVAL) >= FAULT_LOG_INTERVAL:
            self._logged[kind] = now
            logger.error(
                "redis error %s: served without redis, not an outage",
                kind,
                extra={"error": kind, "detail": detail},
            )

    @property
    def current_fault(self) -> str | None:
        """`KIND (operation: message)` of a fault seen within FAULT_HOLD_SECONDS, else None."""
        if self._fault is None:
            return None
        kind, detail, seen = self._fault
        if time.monotonic() - seen > FAULT_HOLD_SECONDS:
            self._fault = None
            return None
        return f"{kind} ({detail})"

    async def _probe_until_closed(self) -> None:
        while self._opened_at is not None:
            await asyncio.sleep(self._pause)
            try:
                await self._probe_call()
            except REDIS_ERRORS as exc:
                if fault_kind(exc) is not None and fault_kind(exc) not in ("AUTH", "TLS"):
                    # Redis answers (with an error): it is reachable, the fault is reported
                    # by the calls that meet it.
                    self.succeeded()
                continue
            self.succeeded()

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
            self._probe = None
