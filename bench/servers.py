"""The processes under test: the service (`python -m api`), its event worker
(`python -m api.worker`, the soak's), and the reference app.

Each runs in its own session (process group), so stopping it stops its uvicorn
workers too; output goes to a log file whose tail is shown when it fails to start.
With `loop_lag`, each samples its event loop and GC pauses into `<name>-lag/`
(`bench/serve.py`): the service then runs as `python -m bench.serve`, which is
`python -m api` with that hook.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.environment import ROOT, SetupError
from bench.serve import GC_FREEZE_VARIABLE, LAG_DIR_VARIABLE, hooks_requested

READY_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
# Quotas no bench run can spend: the limiter still does all its work on every request.
UNREACHABLE_QUOTA = "1000000000/60"


@dataclass
class Server:
    """One started process group, serving on 127.0.0.1:`port`."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, path: str, timeout: float = READY_TIMEOUT) -> None:
        """Poll `path` until it answers 200; fail with the log tail if the process dies."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise SetupError(
                        f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(self.url + path).status_code == 200:
                        return
                time.sleep(0.2)
        raise SetupError(f"{self.name} did not answer {path} in {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM to the supervisor (graceful), then SIGKILL to the whole group if it lingers."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=5)
        # Workers that outlived their supervisor (even one that died) belong to its group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(name: str, command: list[str], env: dict[str, str], log_dir: Path, port: int) -> Server:
    log_path = log_dir / f"{name}.log"
    # Appended: a deployment started once per round keeps one log.
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Server(name=name, port=port, process=process, log_path=log_path)


def service_env(
    base: dict[str, str], *, port: int, workers: int, **overrides: str
) -> dict[str, str]:
    """The service's environment: the run's names (in `base`), quiet logs, unreachable quotas."""
    return {
        **base,
        "APP_ENV": "development",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "WORKERS": str(workers),
        "LOGLEVEL": "WARNING",
        "RATE_LIMIT_DEFAULT": UNREACHABLE_QUOTA,
        "RATE_LIMIT_AUTH": UNREACHABLE_QUOTA,
        "RATE_LIMIT_ORDERS_CREATE": UNREACHABLE_QUOTA,
        "RATE_LIMIT_ENABLED": "true",
        # Tokens outlive the run.
        "JWT_LIFETIME": "120",
        **overrides,
    }


@dataclass(frozen=True, slots=True)
class Deployment:
    """One configuration of the service: its worker count and settings overrides."""

    name: str
    workers: int
    port: int = field(default_factory=free_port)
    overrides: dict[str, str] = field(default_factory=dict)
    # `api`, or `api.worker` for the relay and status consumer without the HTTP API.
    module: str = "api"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def lag_dir(log_dir: Path, name: str) -> Path:
    return log_dir / f"{name}-lag"


def _hooks(env: dict[str, str], log_dir: Path, name: str, loop_lag: bool) -> dict[str, str]:
    if loop_lag:
        directory = lag_dir(log_dir, name)
        directory.mkdir(exist_ok=True)
        env[LAG_DIR_VARIABLE] = str(directory)
    return env


def start_service(
    deployment: Deployment, base_env: dict[str, str], log_dir: Path, *, loop_lag: bool = False
) -> Server:
    """`python -m api` as `deployment` says; started again, it serves on the same port."""
    env = service_env(
        base_env, port=deployment.port, workers=deployment.workers, **deployment.overrides
    )
    env = _hooks(env, log_dir, deployment.name, loop_lag)
    # Each start gets a clean directory for its workers' shared metrics.
    metrics_dir = log_dir / f"{deployment.name}-metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir()
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    module = deployment.module
    if module == "api.worker":
        env["WORKER_PORT"] = str(deployment.port)
    elif hooks_requested(env):
        module = "bench.serve"
    command = [sys.executable, "-m", module]
    return start(deployment.name, command, env, log_dir, deployment.port)


def start_reference(
    base_env: dict[str, str], log_dir: Path, *, workers: int, loop_lag: bool = False
) -> Server:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "bench.reference_app",
        f"--port={port}",
        f"--workers={workers}",
    ]
    # The reference app's own start-up has nothing to freeze; only the sampler applies.
    env = {name: value for name, value in base_env.items() if name != GC_FREEZE_VARIABLE}
    return start("reference", command, _hooks(env, log_dir, "reference", loop_lag), log_dir, port)
