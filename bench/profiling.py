"""Optional py-spy profiles of the service's workers under a scenario's load (BENCH_PROFILE=1).

The profile pass runs after the timed rounds, so the sampler never slows a measured
run. It writes py-spy's collapsed stacks next to a short summary of where the
workers spend their time (self and inclusive share of samples, top frames).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

from bench.environment import ROOT

SAMPLING_RATE = 200
TOP_FRAMES = 25
PROJECT_CODE = ("api/", "bench/")
_PROCESS_FRAME = re.compile(r'process \d+:"[^"]*";?')


def find_py_spy() -> str | None:
    """py-spy on PATH (e.g. `uv run --with py-spy python -m bench`)."""
    return shutil.which("py-spy")


def start_recording(binary: str, pid: int, seconds: float, output: Path) -> subprocess.Popen[bytes]:
    """Sample the process tree of `pid` for `seconds`, without pausing it."""
    command = [
        binary,
        "record",
        f"--pid={pid}",
        "--subprocesses",
        "--nonblocking",
        f"--rate={SAMPLING_RATE}",
        f"--duration={max(1, round(seconds))}",
        "--format=raw",
        f"--output={output}",
    ]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def summarise(stacks_path: Path, title: str) -> str:
    """The frames holding most samples: self (on CPU there) and inclusive (anywhere below)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in stacks_path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        # Process frames quote their command line, which may itself hold a ";".
        frames = [frame for frame in _PROCESS_FRAME.sub("", stack).split(";") if frame]
        if not frames:
            continue
        total += count
        own[_short(frames[-1])] += count
        for function in {_function(frame) for frame in frames}:
            if function.split(" (", 1)[-1].startswith(PROJECT_CODE):
                inclusive[function] += count
    if not total:
        return f"{title}: no samples"
    lines = [f"{title}: {total} samples at {SAMPLING_RATE} Hz", "", "self:"]
    lines += [f"  {count / total:6.1%}  {frame}" for frame, count in own.most_common(TOP_FRAMES)]
    lines += ["", f"inclusive, frames of this project ({', '.join(PROJECT_CODE)}):"]
    lines += [
        f"  {count / total:6.1%}  {frame}" for frame, count in inclusive.most_common(TOP_FRAMES)
    ]
    return "\n".join(lines)


def _short(frame: str) -> str:
    """`function (path/to/site-packages/pkg/mod.py:12)` with the path cut to the package."""
    name, _, location = frame.partition(" (")
    for marker in ("site-packages/", f"{ROOT}/", "lib/python3"):
        if marker in location:
            location = location.split(marker, 1)[1]
            break
    return f"{name} ({location}" if location else name


def _function(frame: str) -> str:
    """The frame without its line number, so one function's lines add up."""
    short = _short(frame)
    head, _, _ = short.rpartition(":")
    return f"{head})" if head else short
