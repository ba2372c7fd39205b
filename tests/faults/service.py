"""The service as production runs it: `python -m api` (uvicorn, 2 workers), own process group."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from api.configs import Settings
from tests.event_helpers import settings_env

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKERS = 2
# uvicorn's timeout_graceful_shutdown in api/__main__.py.
GRACEFUL_TIMEOUT = 30.0
START_TIMEOUT = 40.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class RunningService:
    process: asyncio.subprocess.Process
    port: int
    log_path: Path
    settings: Settings

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs: object) -> httpx.AsyncClient:
        """A client for this service; loopback only, no proxies from the environment."""
        options: dict[str, object] = {"timeout": 30.0, "trust_env": False, **kwargs}
        return httpx.AsyncClient(base_url=self.base_url, **options)  # type: ignore[arg-type]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> list[int]:
        return _children(self.process.pid)

    def worker_of(self, client_port: int) -> int | None:
        """The worker holding the server side of our connection from `client_port`."""
        inodes = _tcp_inodes(local_port=self.port, remote_port=client_port)
        for pid in self.worker_pids():
            if _socket_inodes(pid) & inodes:
                return pid
        return None

    def postgres_client_ports(self) -> set[int]:
        """Local ports of the workers' connections to PostgreSQL (pg_stat_activity.client_port)."""
        owned = set().union(*(_socket_inodes(pid) for pid in self.worker_pids()))
        return {
            local
            for local, inode in _tcp_sockets(remote_port=self.settings.POSTGRES_PORT).items()
            if inode in owned
        }


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


def _socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(int(link[8:-1]))
    return inodes


def _tcp_sockets(*, remote_port: int, local_port: int | None = None) -> dict[int, int]:
    """Loopback IPv4 sockets to `remote_port`: local port -> inode."""
    found: dict[int, int] = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local = fields[1].split(":")[1]
        remote_ip, remote = fields[2].split(":")
        if remote_ip != "0100007F" or int(remote, 16) != remote_port:
            continue
        if local_port is None or int(local, 16) == local_port:
            found[int(local, 16)] = int(fields[9])
    return found


def _tcp_inodes(*, local_port: int, remote_port: int) -> set[int]:
    return set(_tcp_sockets(remote_port=remote_port, local_port=local_port).values())


def client_port(response: httpx.Response) -> int:
    """The local port of the TCP connection that carried `response`."""
    stream = response.extensions["network_stream"]
    port: int = stream.get_extra_info("client_addr")[1]
    return port


def service_env(settings: Settings, port: int, metrics_dir: Path, **extra: str) -> dict[str, str]:
    """This run's isolated names (database, Redis prefix, RabbitMQ names), on a port of its own."""
    values = {
        "APP_ENV": "development",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "WORKERS": str(WORKERS),
        "LOGLEVEL": "WARNING",
        "REDIS_HOST": settings.REDIS_HOST,
        "REDIS_PORT": str(settings.REDIS_PORT),
        "REDIS_DB": str(settings.REDIS_DB),
        "REDIS_KEY_PREFIX": settings.REDIS_KEY_PREFIX,
        "RATE_LIMIT_DEFAULT": settings.RATE_LIMIT_DEFAULT,
        "RATE_LIMIT_AUTH": settings.RATE_LIMIT_AUTH,
        "RATE_LIMIT_ORDERS_CREATE": settings.RATE_LIMIT_ORDERS_CREATE,
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    return settings_env(settings, **{**values, **extra})


async def wait_until_serving(service: RunningService, *, timeout: float = START_TIMEOUT) -> None:
    """Until every worker has answered /ping (uvicorn serves only once a lifespan started)."""
    deadline = time.monotonic() + timeout
    answered: set[int] = set()
    while len(answered) < WORKERS:
        if service.process.returncode is not None:
            raise RuntimeError(f"the service exited early:\n{service.log()[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{len(answered)} workers up after {timeout}s:\n{service.log()[-3000:]}"
            )
        # A fresh connection each time: the kernel hands it to whichever worker accepts first.
        async with service.client(timeout=2.0) as client:
            with contextlib.suppress(httpx.HTTPError):
                response = await client.get("/ping")
                worker = service.worker_of(client_port(response))
                if response.status_code == 200 and worker is not None:
                    answered.add(worker)
                    continue
        await asyncio.sleep(0.1)


async def consumer_count(settings: Settings, queue: str) -> int:
    """Consumers of `queue` now, the waiting ones included (0 when RabbitMQ does not answer).

    The status queue has a single active consumer, and a queue declaration reports only
    that one, so the consumers are listed by `rabbitmqctl list_consumers` (read-only).
    """
    try:
        process = await asyncio.create_subprocess_exec(
            "rabbitmqctl",
            "-q",
            "list_consumers",
            "-p",
            settings.RMQ_VHOST,
            "--no-table-headers",
            "queue_name",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        stdout, _ = await asyncio.wait_for(process.communicate(), 15)
    except (OSError, TimeoutError):
        return 0
    if process.returncode != 0:
        return 0
    return sum(1 for line in stdout.decode().splitlines() if line.strip() == queue)


async def wait_for_consumers(settings: Settings, queue: str, count: int, timeout: float) -> float:
    """Seconds until `queue` has at least `count` consumers."""
    started = time.monotonic()
    while (found := await consumer_count(settings, queue)) < count:
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{queue}: {found} consumers after {timeout}s, wanted {count}")
        await asyncio.sleep(0.2)
    return time.monotonic() - started


async def stop_service(
    process: asyncio.subprocess.Process, *, timeout: float = GRACEFUL_TIMEOUT + 5
) -> float | None:
    """SIGTERM the master; SIGKILL its whole process group if it is not gone in `timeout`.

    Returns the seconds the graceful stop took, or None when it had to be killed.
    """
    started = time.monotonic()
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            kill_group(process)
            await process.wait()
            return None
    kill_group(process)  # a worker the master lost track of must not outlive the test
    return time.monotonic() - started


def kill_group(process: asyncio.subprocess.Process) -> None:
    """SIGKILL the process group this test started (the master made it with start_new_session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


@contextlib.asynccontextmanager
async def running_service(
    settings: Settings,
    workdir: Path,
    *,
    port: int | None = None,
    start_timeout: float = START_TIMEOUT,
    **extra: str,
) -> AsyncIterator[RunningService]:
    """`python -m api` with WORKERS=2 on `port` (default: a free one); stopped on exit."""
    port = port or free_port()
    metrics_dir = workdir / f"metrics-{port}"
    metrics_dir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"service-{port}.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "api",
            cwd=REPO_ROOT,
            env=service_env(settings, port, metrics_dir, **extra),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    service = RunningService(process=process, port=port, log_path=log_path, settings=settings)
    try:
        await wait_until_serving(service, timeout=start_timeout)
        yield service
    finally:
        await stop_service(process)
