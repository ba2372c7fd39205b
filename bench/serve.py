"""`python -m bench.serve`: `python -m api` with the bench's hooks in every worker.

Nothing in `api/` knows about the bench: this runs `api.__main__.main()` (same checks,
same uvicorn settings) with the app factory swapped for `create_app` below, which
builds the API's app and, by environment, adds:

- `BENCH_LOOP_LAG_DIR=<dir>`: each worker samples its event loop every 10 ms (how late
  a 10 ms sleep wakes up: the time a ready callback waits behind others) and counts the
  garbage collector's pauses (`gc.callbacks`), appending one line per sample to
  `<dir>/lag-<pid>.tsv`; `bench.tail` reads the lines of a round's time window;
- `BENCH_GC_FREEZE=0|1`: once start-up is done, `gc.unfreeze()` (0: the service as it
  was before its lifespan froze the heap, for comparing) or `gc.collect()` then
  `gc.freeze()` (1: what `api/main.py` does anyway; for other code under test).

The reference app installs the same hooks (`install`), so both sides pay the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

LAG_DIR_VARIABLE = "BENCH_LOOP_LAG_DIR"
GC_FREEZE_VARIABLE = "BENCH_GC_FREEZE"
SAMPLE_INTERVAL = 0.010
# Lines are written once a second: the file write is on the loop, so it stays rare.
FLUSH_EVERY = 100
API_FACTORY = "api.main:create_app"


def hooks_requested(env: dict[str, str]) -> bool:
    return bool(env.get(LAG_DIR_VARIABLE)) or env.get(GC_FREEZE_VARIABLE) in ("0", "1")


class LoopSampler:
    """Loop lag every 10 ms and the GC pauses in between, one TSV line per sample.

    A line: monotonic time (s), lag (ms), then since the previous line: collections,
    their total and longest pause (ms), and how many were of the oldest generation.
    `time.monotonic()` is the same clock in every process, so the bench can cut the
    lines of a round's window.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lines: list[str] = []
        self._gc_started = 0.0
        self._gc_count = 0
        self._gc_total = 0.0
        self._gc_max = 0.0
        self._gc_full = 0
        self._task: asyncio.Task[None] | None = None

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        pause = time.perf_counter() - self._gc_started
        self._gc_count += 1
        self._gc_total += pause
        self._gc_max = max(self._gc_max, pause)
        if info.get("generation") == 2:
            self._gc_full += 1

    def start(self) -> None:
        gc.callbacks.append(self._on_gc)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._on_gc)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._flush()

    async def _run(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(SAMPLE_INTERVAL)
            now = time.monotonic()
            lag = max(0.0, now - before - SAMPLE_INTERVAL)
            self._lines.append(
                f"{now:.6f}\t{lag * 1e3:.3f}\t{self._gc_count}\t{self._gc_total * 1e3:.3f}"
                f"\t{self._gc_max * 1e3:.3f}\t{self._gc_full}\n"
            )
            self._gc_count = self._gc_full = 0
            self._gc_total = self._gc_max = 0.0
            if len(self._lines) >= FLUSH_EVERY:
                self._flush()

    def _flush(self) -> None:
        if self._lines:
            with self._path.open("a") as out:
                out.writelines(self._lines)
            self._lines.clear()


@dataclass(frozen=True, slots=True)
class LagSummary:
    """A time window of the samplers' lines, all workers together."""

    samples: int
    lag_p50_ms: float
    lag_p99_ms: float
    lag_max_ms: float
    gc_count: int
    gc_total_ms: float
    gc_max_ms: float
    gc_full: int

    def text(self) -> str:
        return (
            f"loop lag p50 {self.lag_p50_ms:.1f} p99 {self.lag_p99_ms:.1f} "
            f"max {self.lag_max_ms:.1f} ms; GC {self.gc_count} pauses, "
            f"{self.gc_total_ms:.0f} ms in all, longest {self.gc_max_ms:.1f} ms, "
            f"{self.gc_full} full"
        )


class LagReader:
    """Reads the samplers' files of one deployment, each from where the last read ended."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._offsets: dict[Path, int] = {}

    def window(self, start: float, end: float) -> LagSummary | None:
        """The lines stamped within [start, end]; None when there are none."""
        lags: list[float] = []
        gc_count = gc_full = 0
        gc_total = gc_max = 0.0
        for path in sorted(self.directory.glob("lag-*.tsv")):
            with path.open() as lines:
                lines.seek(self._offsets.get(path, 0))
                data = lines.read()
            # A line still being written stays for the next read.
            complete = data[: data.rfind("\n") + 1]
            self._offsets[path] = self._offsets.get(path, 0) + len(complete)
            for line in complete.splitlines():
                stamp, lag, count, total, longest, full = line.split("\t")
                if not start <= float(stamp) <= end:
                    continue
                lags.append(float(lag))
                gc_count += int(count)
                gc_total += float(total)
                gc_max = max(gc_max, float(longest))
                gc_full += int(full)
        if not lags:
            return None
        lags.sort()
        return LagSummary(
            samples=len(lags),
            lag_p50_ms=lags[len(lags) // 2],
            lag_p99_ms=lags[min(len(lags) - 1, int(len(lags) * 0.99))],
            lag_max_ms=lags[-1],
            gc_count=gc_count,
            gc_total_ms=gc_total,
            gc_max_ms=gc_max,
            gc_full=gc_full,
        )


def install(app: FastAPI) -> FastAPI:
    """Wrap the app's lifespan: after start-up, freeze the heap and/or start the sampler."""
    lag_dir = os.environ.get(LAG_DIR_VARIABLE)
    freeze = os.environ.get(GC_FREEZE_VARIABLE)
    if not lag_dir and freeze not in ("0", "1"):
        return app
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[Any]:
        async with inner(app) as state:
            if freeze == "1":
                gc.collect()
                gc.freeze()
            elif freeze == "0":
                gc.unfreeze()
            sampler = None
            if lag_dir:
                sampler = LoopSampler(Path(lag_dir) / f"lag-{os.getpid()}.tsv")
                sampler.start()
            try:
                yield state
            finally:
                if sampler is not None:
                    await sampler.stop()

    app.router.lifespan_context = lifespan
    return app


def create_app() -> FastAPI:
    """The API's app (as `python -m api` builds it), with the hooks the environment asks for."""
    from api.main import create_app as create_api_app

    return install(create_api_app())


def main() -> None:
    """`api.__main__.main()`, its uvicorn factory replaced by this module's."""
    from api import __main__ as api_main

    serve = uvicorn.run

    def run(app: Any, **kwargs: Any) -> None:
        assert app == API_FACTORY, f"api/__main__.py now serves {app!r}: update bench/serve.py"
        serve("bench.serve:create_app", **kwargs)

    uvicorn.run = run
    api_main.main()


if __name__ == "__main__":
    main()
