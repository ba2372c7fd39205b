"""How much CPU other work took while a scenario ran: the noise behind a figure.

On a shared 2-core machine another test suite can take a core in the middle of a
round. The runner samples `/proc` before and after each wrk run and splits the
processes into the run's own (the runner and its wrk, the servers' process groups,
the PostgreSQL backends of the run's database, and the shared Redis, RabbitMQ and
PostgreSQL housekeeping) and the others; the others' CPU time over the window, in
cores, is the noise. Busy time of processes that ended inside the window cannot be
given to either side and is reported apart.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SHARED_SERVICES = frozenset({"redis-server", "beam.smp", "erl_child_setup", "epmd"})
# `postgres: 15/main: <user> <database> <client> ...`: a backend serving one database.
_BACKEND = re.compile(r"^postgres: [^:]+: \S+ (\S+) ")


@dataclass(frozen=True, slots=True)
class CpuSample:
    at: float
    busy_ticks: int
    own_ticks: dict[int, int]
    # Other processes: pid -> (name, ticks), to name the biggest consumers.
    other_ticks: dict[int, tuple[str, int]]


@dataclass(frozen=True, slots=True)
class OtherWork:
    # Cores used by other processes alive at the end of the window.
    cores: float
    # Busy time neither side accounts for: processes that ended inside the window
    # (short-lived commands, PostgreSQL connections the run's pools closed).
    unattributed: float
    # The biggest other consumers, e.g. `pytest 0.61`.
    top: list[str]


def sample(sessions: Collection[int], database: str) -> CpuSample:
    """All CPUs' busy time and the CPU time of every process, split into own and other."""
    own: dict[int, int] = {}
    other: dict[int, tuple[str, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        found = _process_ticks(entry, sessions, database)
        if found is None:
            continue
        name, ticks, is_own = found
        if is_own:
            own[int(entry.name)] = ticks
        else:
            other[int(entry.name)] = (name, ticks)
    return CpuSample(time.monotonic(), _busy_ticks(), own, other)


def other_work(before: CpuSample, after: CpuSample) -> OtherWork:
    """Cores' worth of CPU that other work used between the two samples."""
    seconds = after.at - before.at
    if seconds <= 0:
        return OtherWork(0.0, 0.0, [])
    scale = CLOCK_TICKS * seconds
    own = sum(ticks - before.own_ticks.get(pid, 0) for pid, ticks in after.own_ticks.items())
    consumers: dict[str, int] = {}
    for pid, (name, ticks) in after.other_ticks.items():
        # A process started inside the window used all its time there.
        earlier = before.other_ticks.get(pid, (name, 0))[1]
        consumers[name] = consumers.get(name, 0) + max(0, ticks - earlier)
    other = sum(consumers.values())
    rest = max(0, after.busy_ticks - before.busy_ticks - own - other)
    top = sorted(consumers.items(), key=lambda item: item[1], reverse=True)[:3]
    return OtherWork(
        other / scale,
        rest / scale,
        [f"{name} {ticks / scale:.2f}" for name, ticks in top if ticks],
    )


def _busy_ticks() -> int:
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    values = [int(value) for value in fields]
    idle, iowait = values[3], values[4]
    # guest time is already inside user time.
    return sum(values[:8]) - idle - iowait


def _process_ticks(
    entry: Path, sessions: Collection[int], database: str
) -> tuple[str, int, bool] | None:
    """(name, CPU ticks, whether it is the run's own) of one process; None if it is gone."""
    try:
        stat = (entry / "stat").read_text()
    except OSError:
        return None
    command, _, rest = stat.rpartition(") ")
    fields = rest.split()
    name = command.rpartition("(")[2]
    ticks = int(fields[11]) + int(fields[12])
    if int(fields[3]) in sessions or name in SHARED_SERVICES:
        # Plus the reaped children's: wrk, once the runner has waited for it.
        return name, ticks + int(fields[13]) + int(fields[14]), True
    if name != "postgres":
        return name, ticks, False
    try:
        title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    backend = _BACKEND.match(title)
    if backend is None:
        return name, ticks, True
    return f"postgres ({backend.group(1)})", ticks, backend.group(1) == database
