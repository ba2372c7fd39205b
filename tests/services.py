"""Stop and restart the real local services for fault tests; always restored in `finally`.

A file lock serialises fault injection across concurrent test runs on one machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

LOCK_PATH = Path(tempfile.gettempdir()) / "orders-api-fault-injection.lock"


_lock_depth = 0


@contextlib.asynccontextmanager
async def fault_lock() -> AsyncIterator[None]:
    """Held while a fault is injected; re-entrant within this process, so a test can hold it
    around a whole scenario. Waited for asynchronously, so the event loop (and any load a
    test is measuring) keeps running while another run holds it."""
    global _lock_depth
    if _lock_depth:
        _lock_depth += 1
        try:
            yield
        finally:
            _lock_depth -= 1
        return
    with LOCK_PATH.open("w") as handle:
        # Polled without blocking, so a cancelled wait (a test timeout) leaves nothing behind.
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(0.2)
        _lock_depth = 1
        try:
            yield
        finally:
            _lock_depth = 0
            fcntl.flock(handle, fcntl.LOCK_UN)


def port_answers(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


async def wait_port(port: int, *, up: bool, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if port_answers(port) is up:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"port {port} still {'down' if up else 'up'} after {seconds}s")


def _run(*args: str, timeout: float = 60) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=timeout)


async def start_rabbitmq() -> None:
    await asyncio.to_thread(_run, "rabbitmqctl", "-q", "start_app", timeout=90)
    await wait_port(5672, up=True, seconds=90)


@contextlib.asynccontextmanager
async def rabbitmq_stopped() -> AsyncIterator[None]:
    """RabbitMQ's app stopped (the node stays up), restarted on exit whatever happens."""
    async with fault_lock():
        try:
            await asyncio.to_thread(_run, "rabbitmqctl", "-q", "stop_app", timeout=90)
            await wait_port(5672, up=False)
            yield
        finally:
            await start_rabbitmq()


async def start_redis() -> None:
    if not port_answers(6379):
        await asyncio.to_thread(
            _run,
            "redis-server",
            "--daemonize",
            "yes",
            "--bind",
            "127.0.0.1",
            "-::1",
            "--port",
            "6379",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            "/var/lib/redis",
            "--logfile",
            "/var/log/redis/ci.log",
        )
    await wait_port(6379, up=True, seconds=30)


@contextlib.asynccontextmanager
async def redis_stopped() -> AsyncIterator[None]:
    """Redis shut down (it keeps nothing on disk here), restarted on exit whatever happens."""
    async with fault_lock():
        try:
            with contextlib.suppress(subprocess.CalledProcessError):
                await asyncio.to_thread(_run, "redis-cli", "-p", "6379", "shutdown", "nosave")
            await wait_port(6379, up=False)
            yield
        finally:
            await start_redis()


def _postgres_version() -> str:
    return sorted(p.name for p in Path("/etc/postgresql").iterdir())[-1]


def _pg_ctlcluster(action: str, *options: str) -> None:
    version = _postgres_version()
    _run("pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action, *options)


async def restart_postgres(down_for: float = 2.0) -> tuple[float, float]:
    """Stop PostgreSQL (fast: every connection is cut), wait `down_for` s, start it again.

    Always started again, whatever fails. Returns the monotonic times it went down and
    accepted connections again.
    """
    async with fault_lock():
        try:
            await asyncio.to_thread(_pg_ctlcluster, "stop", "-m", "fast")
            stopped = time.monotonic()
            await asyncio.sleep(down_for)
        finally:
            await asyncio.to_thread(_pg_ctlcluster, "start")
            await wait_port(5432, up=True)
        return stopped, time.monotonic()


@contextlib.asynccontextmanager
async def redis_paused(milliseconds: int) -> AsyncIterator[None]:
    """`CLIENT PAUSE <ms> ALL`: Redis holds every client's commands; unpaused on exit anyway."""
    async with fault_lock():
        try:
            await asyncio.to_thread(
                _run, "redis-cli", "-p", "6379", "client", "pause", str(milliseconds), "all"
            )
            yield
        finally:
            await asyncio.to_thread(_run, "redis-cli", "-p", "6379", "client", "unpause")


@contextlib.asynccontextmanager
async def postgres_stopped() -> AsyncIterator[None]:
    """PostgreSQL stopped (fast shutdown), started again on exit whatever happens."""
    version = _postgres_version()
    async with fault_lock():
        try:
            await asyncio.to_thread(
                _run,
                "pg_ctlcluster",
                "--skip-systemctl-redirect",
                version,
                "main",
                "stop",
                "-m",
                "fast",
            )
            yield
        finally:
            await asyncio.to_thread(
                _run, "pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"
            )
            await wait_port(5432, up=True)
