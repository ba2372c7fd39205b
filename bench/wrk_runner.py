"""Drive wrk with the scripts in `bench/wrk/` and read the JSON line their `done()` prints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from bench.progress import log

SCRIPTS = Path(__file__).parent / "wrk"
# wrk's own bound per request; a request slower than this is counted as a timeout error.
REQUEST_TIMEOUT = "10s"


class WrkError(RuntimeError):
    """wrk could not be found, installed or run."""


@dataclass(frozen=True, slots=True)
class Load:
    """What one wrk run sends: the URL, its script, and the script's inputs."""

    url: str
    script: str = "get.lua"
    token: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    paths_file: Path | None = None
    body_file: Path | None = None
    # More variables for the script (the soak's think time, say).
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WrkResult:
    """One run: counts and wrk's latency histogram (what `--latency` prints, and more)."""

    requests: int
    seconds: float
    errors: dict[str, int]
    p50_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    mean_ms: float
    max_ms: float
    # What the script's `bench.extra` reported (the soak's requests sent by kind).
    extra: dict[str, int] | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def ensure_wrk() -> str:
    """The wrk binary, installed from Debian packages when it is missing."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise WrkError("wrk is missing and cannot be installed here: run `apt-get install -y wrk`")
    log("wrk is missing: apt-get install -y wrk")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "wrk"]
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
        # The package lists may be missing or stale on a fresh machine.
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        subprocess.run(install, env=env, capture_output=True, check=False)
    found = shutil.which("wrk")
    if not found:
        raise WrkError("wrk is missing and `apt-get install -y wrk` failed: install it by hand")
    return found


def wrk_version(binary: str) -> str:
    result = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
    lines = (result.stdout or result.stderr).splitlines()
    return lines[0].split(" Copyright")[0].strip() if lines else ""


def run_wrk(
    binary: str, load: Load, *, seconds: float, connections: int, threads: int
) -> WrkResult:
    """One bounded wrk run over loopback."""
    env = {
        **os.environ,
        "BENCH_WRK_DIR": str(SCRIPTS),
        "BENCH_RUN_ID": uuid.uuid4().hex,
        "BENCH_TOKEN": load.token or "",
        "BENCH_HEADERS": "\n".join(f"{name}: {value}" for name, value in load.headers.items()),
        "BENCH_PATHS_FILE": str(load.paths_file or ""),
        "BENCH_BODY_FILE": str(load.body_file or ""),
        **load.env,
    }
    command = [
        binary,
        f"--threads={min(threads, connections)}",
        f"--connections={connections}",
        f"--duration={max(1, round(seconds))}s",
        f"--timeout={REQUEST_TIMEOUT}",
        f"--script={SCRIPTS / load.script}",
        load.url,
    ]
    completed = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    return parse_output(completed.stdout, completed.stderr, completed.returncode)


def parse_output(stdout: str, stderr: str, returncode: int) -> WrkResult:
    """The `BENCH_JSON` line of `common.lua`'s `done()`."""
    line = next((ln for ln in stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if returncode != 0 or line is None:
        detail = (stderr or stdout).strip().splitlines()[-3:]
        raise WrkError(f"wrk failed (exit {returncode}): {' | '.join(detail)}")
    data = json.loads(line.removeprefix("BENCH_JSON "))
    latency = data["latency_us"]
    return WrkResult(
        requests=int(data["requests"]),
        seconds=data["duration_us"] / 1e6,
        errors={name: int(count) for name, count in data["errors"].items()},
        p50_ms=latency["p50"] / 1000,
        p75_ms=latency["p75"] / 1000,
        p90_ms=latency["p90"] / 1000,
        p99_ms=latency["p99"] / 1000,
        p999_ms=latency["p99.9"] / 1000,
        mean_ms=latency["mean"] / 1000,
        max_ms=latency["max"] / 1000,
        extra=data.get("extra"),
    )
