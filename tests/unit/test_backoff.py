"""The one reconnect loop: capped jittered delays, one warning per outage, fatal errors end it."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import pytest

from api.helpers.backoff import Backoff, reconnect_forever

logger = logging.getLogger("tests.unit.backoff")


def test_delays_double_from_the_initial_up_to_the_cap_with_twenty_percent_jitter() -> None:
    nominal = [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    delays = [
        [backoff.next() for _ in nominal] for backoff in (Backoff(0.5, 5.0) for _ in range(100))
    ]
    for run in delays:
        for delay, expected in zip(run, nominal, strict=True):
            assert expected * 0.8 <= delay <= expected * 1.2
    # Jittered: a hundred clients do not retry in lockstep.
    assert len({run[0] for run in delays}) > 90


def test_reset_starts_again_from_the_initial_delay() -> None:
    backoff = Backoff(1.0, 8.0)
    for _ in range(5):
        backoff.next()
    backoff.reset()
    assert 0.8 <= backoff.next() <= 1.2


async def test_sleep_ends_as_soon_as_stop_is_set() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, stop.set)
    started = time.monotonic()
    assert await Backoff(30.0, 30.0).sleep(stop) is True
    assert time.monotonic() - started < 5


async def test_sleep_without_stop_sleeps_the_delay() -> None:
    started = time.monotonic()
    assert await Backoff(0.05, 0.05).sleep() is False
    assert time.monotonic() - started >= 0.04


async def test_an_outage_is_one_warning_then_one_info_when_it_is_over(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stop = asyncio.Event()
    calls = 0

    async def session() -> None:
        nonlocal calls
        calls += 1
        if calls <= 3:
            raise ConnectionRefusedError("connect to amqp://guest:s3cret@broker failed")
        stop.set()  # the fourth session connected; it returns when the connection is lost

    caplog.set_level(logging.DEBUG, logger=logger.name)
    await asyncio.wait_for(
        reconnect_forever(
            session, name="broker", logger=logger, stop=stop, backoff=Backoff(0.001, 0.002)
        ),
        timeout=5,
    )
    assert calls == 4
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == logger.name]
    assert lines == [
        (logging.WARNING, "broker unavailable, retrying"),
        (logging.DEBUG, "broker still unavailable"),
        (logging.DEBUG, "broker still unavailable"),
        (logging.INFO, "broker available again"),
    ]
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING)
    # The error's type only: a library's message may quote a URL with its password.
    assert vars(warning)["error"] == "ConnectionRefusedError"
    assert "s3cret" not in caplog.text


async def test_a_session_that_ends_at_once_is_not_restarted_in_a_tight_loop() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    started: list[float] = []

    async def session() -> None:
        started.append(loop.time())
        if len(started) == 4:
            stop.set()

    await asyncio.wait_for(
        reconnect_forever(
            session, name="node", logger=logger, stop=stop, backoff=Backoff(0.05, 0.05)
        ),
        timeout=5,
    )
    gaps = [later - earlier for earlier, later in itertools.pairwise(started)]
    assert len(gaps) == 3
    assert min(gaps) >= 0.04


async def test_a_fatal_error_ends_the_loop_without_a_retry() -> None:
    calls = 0

    class Misconfigured(Exception):
        pass

    async def session() -> None:
        nonlocal calls
        calls += 1
        raise Misconfigured

    with pytest.raises(Misconfigured):
        await asyncio.wait_for(
            reconnect_forever(
                session,
                name="queue",
                logger=logger,
                stop=asyncio.Event(),
                backoff=Backoff(0.001, 0.001),
                fatal=(Misconfigured,),
            ),
            timeout=5,
        )
    assert calls == 1


async def test_the_loop_does_not_start_once_stop_is_set() -> None:
    stop = asyncio.Event()
    stop.set()
    called = False

    async def session() -> None:
        nonlocal called
        called = True

    await reconnect_forever(session, name="x", logger=logger, stop=stop)
    assert not called
