"""The bench run: set up, start the processes, seed, drive the rounds, report, clean up.

Every figure is a ratio of two measurements of the same run on the same machine:
the service against a bare reference app, or the service against itself in another
configuration. Rounds alternate over all scenarios, so drift (a noisy neighbour,
a warming cache) is shared, and the median of the rounds is kept.

The service (2 workers) and the reference app run for the whole bench. The other
configurations (limiter off, one worker, Redis Cluster, tracing, PgBouncer) are started
for their scenario and stopped after it, each time: idle pools keep PostgreSQL
connections, and all deployments at once would need more than its default 100.
With BENCH_SOAK set, the soak (`bench/soak.py`) runs instead of all this.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from api.configs import Settings
from bench import checks, environment, pgbouncer, report, servers, soak
from bench.environment import Database, RunNames, SetupError
from bench.otlp_sink import OtlpSink
from bench.outbox_drain import measure_outbox_drain
from bench.progress import log
from bench.reference_app import asyncpg_dsn, create_reference_table
from bench.report import ComparisonResult, ScenarioResult
from bench.scenarios import (
    OUTBOX_KEY,
    Comparison,
    Inputs,
    Scenario,
    build_comparisons,
    build_scenarios,
)
from bench.seed import ORDER_BODY_BYTES, create_orders, register_and_login, service_client
from bench.serve import LagReader
from bench.servers import Deployment, Server
from bench.wrk_runner import WrkError, WrkResult, ensure_wrk, run_wrk, wrk_version
from tests.redis_servers import ClusterServers, start_cluster

# Longer than the reference pool keeps an idle connection, so pools never add up.
PAUSE_BETWEEN_RUNS = 1.5
# The service scenarios the profile pass records.
PROFILED = ("ping", "order_cached", "order_uncached", "order_list", "order_create")
# The key of the outbox drain in BENCH_SCENARIOS.
OUTBOX_SCENARIO = "outbox_drain"
# A 1-minute load average above this before the run means the figures will be noisy.
BUSY_LOAD = 1.0
# The copies serve reads only; without their relays and consumers, the processes that
# publish events are those of the measured deployment, as in production.
BACKGROUND_OFF = {"OUTBOX_RELAY_ENABLED": "false", "STATUS_CONSUMER_ENABLED": "false"}
# The PgBouncer process's name among the run's servers (it serves no HTTP).
PGBOUNCER_PROCESS = "pgbouncer_process"


class ConfigError(ValueError):
    """A BENCH_* variable that is not a positive number (or not a known scenario)."""


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """Knobs, from BENCH_* variables; the defaults keep a full run under 10 minutes."""

    duration: float = 8.0
    rounds: int = 3
    warmup: float = 2.0
    connections: int = 64
    low_connections: int = 8
    threads: int = 2
    workers: int = 2
    orders: int = 1000
    outbox_backlog: int = 20_000
    # 1: every process under test samples its event-loop lag and GC pauses (bench/serve.py).
    loop_lag: int = 1
    # 1: after the rounds, py-spy flame graphs of the service under its main scenarios.
    profile: int = 0
    # Seconds of soak (`make bench SOAK=600`): the soak runs instead of the ratios.
    soak: int = 0
    # The soak's load, as a fraction of the capacity measured first.
    soak_load: float = 0.5
    # Seconds per reported interval of the soak (a minute; shorter for a short soak).
    soak_interval: int = 60
    # Comma-separated scenario keys to run (and `outbox_drain`); empty: all of them.
    scenarios: str = ""

    @classmethod
    def from_env(cls) -> BenchConfig:
        defaults = cls()
        values: dict[str, Any] = {}
        for name in cls.__dataclass_fields__:
            raw = os.environ.get(f"BENCH_{name.upper()}")
            if raw is None or raw == "":
                continue
            kind = type(getattr(defaults, name))
            if kind is str:
                values[name] = raw
                continue
            try:
                value = kind(raw)
            except ValueError:
                raise ConfigError(f"BENCH_{name.upper()}: expected a number, got {raw!r}") from None
            if value < (0 if name in {"warmup", "profile", "loop_lag", "soak"} else 1e-9):
                raise ConfigError(f"BENCH_{name.upper()}: must be positive")
            values[name] = value
        return cls(**values)

    def selected(self, key: str) -> bool:
        return not self.scenarios or key in self.scenarios.replace(" ", "").split(",")


@dataclass
class Run:
    """What the run started and created, so `finally` can undo all of it."""

    config: BenchConfig
    names: RunNames
    settings: Settings
    work_dir: Path
    wrk: str
    deployments: dict[str, Deployment] = field(default_factory=dict)
    servers: dict[str, Server] = field(default_factory=dict)
    database_created: bool = False
    db: Database | None = None
    cluster: ClusterServers | None = None
    # The loop-lag files of each sampled server, by server name.
    lags: dict[str, LagReader] = field(default_factory=dict)

    @property
    def database(self) -> Database:
        assert self.db is not None, "the run's database connection is not open"
        return self.db

    @property
    def base_env(self) -> dict[str, str]:
        return {**os.environ, **self.names.env()}

    def stop(self, name: str) -> None:
        server = self.servers.pop(name, None)
        if server is None:
            return
        try:
            server.stop()
        except Exception as exc:  # one stuck process must not leave the others running
            log(f"stopping {name} failed: {exc}")

    def stop_servers(self) -> None:
        for name in list(self.servers):
            self.stop(name)


def main() -> int:
    try:
        config = BenchConfig.from_env()
        wrk = ensure_wrk()
        log("checking PostgreSQL, Redis and RabbitMQ")
        environment.check_services()
    except (ConfigError, WrkError, SetupError) as exc:
        log(f"cannot run: {exc}")
        return 2
    names = RunNames.new()
    run = Run(
        config=config,
        names=names,
        settings=environment.run_settings(names),
        work_dir=Path(tempfile.mkdtemp(prefix="orders-bench-")),
        wrk=wrk,
    )
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so the cleanup below still runs.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return asyncio.run(bench(run))
    except (SetupError, WrkError) as exc:
        log(f"failed: {exc}")
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        log("cleaning up: processes, database, Redis keys, RabbitMQ names")
        run.stop_servers()
        if run.cluster is not None:
            run.cluster.stop()
        if run.database_created:
            asyncio.run(environment.clean_up(run.settings))
        shutil.rmtree(run.work_dir, ignore_errors=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


async def bench(run: Run) -> int:
    config = run.config
    machine = environment.machine_info()
    if config.soak:
        log(f"run {run.names.suffix}: soak of {config.soak}s, {config.workers} workers")
    else:
        log(
            f"run {run.names.suffix}: {config.rounds} rounds x {config.duration:g}s, "
            f"{config.connections} connections, {config.workers} workers"
        )
    busy = os.getloadavg()[0]
    if busy > BUSY_LOAD:
        log(f"warning: load average {busy:.1f} before the run: other work will add noise")
    log(f"creating database {run.settings.POSTGRES_DB} and migrating it")
    await environment.create_database(run.settings)
    run.database_created = True
    await asyncio.to_thread(environment.migrate, run.base_env)
    run.db = Database(asyncpg_dsn(run.settings))
    try:
        if config.soak:
            return await soak.run_soak(run, machine)
        return await measure(run, machine)
    finally:
        await run.database.close()


async def measure(run: Run, machine: dict[str, Any]) -> int:
    config = run.config
    await warn_about_connections(run)
    reference_ids = await create_reference_table(
        await run.database.connection(), rows=config.orders, payload=ORDER_BODY_BYTES
    )
    if config.selected("order_cached_cluster"):
        log("starting a 6-node Redis Cluster (ports 17001-17006) for the cluster scenario")
        run.cluster = await asyncio.to_thread(start_cluster, run.work_dir / "redis-cluster")
    run.deployments = {
        "service": Deployment("service", config.workers),
        "no_limiter": Deployment(
            "no_limiter",
            config.workers,
            overrides={"RATE_LIMIT_ENABLED": "false", **BACKGROUND_OFF},
        ),
        "one_worker": Deployment("one_worker", 1, overrides=BACKGROUND_OFF),
        # The same service on the 6-node cluster: limiter and cache on RedisCluster.
        "cluster": Deployment(
            "cluster",
            config.workers,
            overrides={
                "REDIS_MODE": "cluster",
                "REDIS_NODES": run.cluster.seeds if run.cluster else "",
                "REDIS_DB": "0",
                **BACKGROUND_OFF,
            },
        ),
    }
    # POST /v1/orders again through a private PgBouncer (transaction mode). The copy has no
    # relay: the measured service's relay publishes its events, as it does the direct ones.
    pooled: dict[str, str] = {}
    if config.selected("order_create_pgbouncer"):
        bouncer = pgbouncer.start_pgbouncer(run.settings, run.work_dir)
        run.servers[PGBOUNCER_PROCESS] = bouncer
        pooled = {"POSTGRES_HOSTS": f"127.0.0.1:{bouncer.port}", "POSTGRES_POOLER": "pgbouncer"}
    run.deployments["pgbouncer"] = Deployment(
        "pgbouncer", config.workers, overrides={**pooled, **BACKGROUND_OFF}
    )
    # POST /v1/orders on API processes without a relay (the deployment with `python -m
    # api.worker`): the copy's events are published by the measured service's relays, a
    # process group of their own, on the same two cores.
    run.deployments["split"] = Deployment("split", config.workers, overrides=BACKGROUND_OFF)
    # The cached read with tracing on, one new trace in ten sampled (SPEC §14), exporting
    # to a sink in this process.
    sink = OtlpSink()
    run.deployments["traced"] = Deployment(
        "traced",
        config.workers,
        overrides={
            "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint,
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.1",
            **BACKGROUND_OFF,
        },
    )
    try:
        return await _measure_all(run, machine, reference_ids)
    finally:
        sink.stop()


async def _measure_all(run: Run, machine: dict[str, Any], reference_ids: list[str]) -> int:
    config = run.config
    await start_servers(run)
    inputs = await seed(run, reference_ids)
    scenarios = [
        scenario
        for scenario in build_scenarios(
            inputs, connections=config.connections, low_connections=config.low_connections
        )
        if config.selected(scenario.key)
    ]
    results = {scenario.key: ScenarioResult(scenario) for scenario in scenarios}

    await warm_up(run, results)
    for round_number in range(1, config.rounds + 1):
        await run_round(run, round_number, results, inputs)
    if config.profile:
        await profile_pass(run, scenarios)

    run.stop_servers()
    comparisons = []
    for item in build_comparisons(config.low_connections, config.connections):
        if item.key != OUTBOX_KEY:
            comparisons.append(report.compare(item, results))
        elif config.selected(OUTBOX_SCENARIO):
            comparisons.append(await measure_outbox(run, item))
        else:
            comparisons.append(ComparisonResult(item, None, False, "not measured"))
    machine["load_average_end"] = [round(value, 2) for value in os.getloadavg()]
    machine["wrk"] = wrk_version(run.wrk)
    publish(run, list(results.values()), comparisons, machine)
    return 0


async def warm_up(run: Run, results: dict[str, ScenarioResult]) -> None:
    """Probe and warm up every scenario of the running servers (copies do it at each start)."""
    seconds = run.config.warmup
    if seconds:
        log(f"warm-up: every scenario for {seconds:g}s")
    for result in results.values():
        if result.scenario.server not in run.servers:
            continue
        await probe_once(run, result)
        if seconds:
            await drive(run, result.scenario, seconds)
            await asyncio.sleep(PAUSE_BETWEEN_RUNS)
    await checks.quiesce(run.database)


async def warn_about_connections(run: Run) -> None:
    """Say so when PostgreSQL has few free connection slots: a full server fails the run."""
    limit = int(await run.database.fetchval("SELECT current_setting('max_connections')::int"))
    used = int(await run.database.fetchval("SELECT count(*) FROM pg_stat_activity"))
    pools = run.settings.POSTGRES_POOL_SIZE + run.settings.POSTGRES_MAX_OVERFLOW
    # The loaded deployment at its pools' peak, another one's idle pools, the relays.
    needed = run.config.workers * (pools + run.settings.POSTGRES_POOL_SIZE) + 10
    if limit - used < needed:
        log(
            f"warning: PostgreSQL has {limit - used} free connections of {limit}; "
            f"the run may need about {needed}"
        )


async def start_servers(run: Run) -> None:
    workers = run.config.workers
    log(f"starting the service and the reference app ({workers} workers each)")
    loop_lag = bool(run.config.loop_lag)
    run.servers["service"] = servers.start_service(
        run.deployments["service"], run.base_env, run.work_dir, loop_lag=loop_lag
    )
    run.servers["reference"] = servers.start_reference(
        run.base_env, run.work_dir, workers=workers, loop_lag=loop_lag
    )
    if loop_lag:
        for name in ("service", "reference"):
            run.lags[name] = LagReader(servers.lag_dir(run.work_dir, name))
    for name, server in run.servers.items():
        if name == PGBOUNCER_PROCESS:
            continue
        await asyncio.to_thread(server.wait_ready, "/json" if name == "reference" else "/ping")
    log("both answer")


@contextlib.asynccontextmanager
async def deployment_copy(run: Run, name: str) -> AsyncIterator[Server]:
    """Start a copy of the service in another configuration; stop it afterwards."""
    loop_lag = bool(run.config.loop_lag)
    server = servers.start_service(
        run.deployments[name], run.base_env, run.work_dir, loop_lag=loop_lag
    )
    if loop_lag:
        run.lags.setdefault(name, LagReader(servers.lag_dir(run.work_dir, name)))
    run.servers[name] = server
    try:
        await asyncio.to_thread(server.wait_ready, "/ping")
        yield server
    finally:
        run.stop(name)


def server_urls(run: Run) -> dict[str, str]:
    urls = {name: deployment.url for name, deployment in run.deployments.items()}
    urls["reference"] = run.servers["reference"].url
    return urls


async def seed(run: Run, reference_ids: list[str]) -> Inputs:
    count = run.config.orders
    async with service_client(run.servers["service"].url) as client:
        log("seeding: registering a reader and a writer, logging them in")
        reader = await register_and_login(client, "reader", run.names.suffix)
        writer = await register_and_login(client, "writer", run.names.suffix)
        log(f"seeding: {count} orders through POST /v1/orders")
        started = time.monotonic()
        order_ids = await create_orders(client, reader, count)
        log(f"seeding: done in {time.monotonic() - started:.1f}s")
    order_paths = run.work_dir / "order-paths.txt"
    order_paths.write_text("".join(f"/v1/orders/{order_id}\n" for order_id in order_ids))
    reference_paths = run.work_dir / "reference-paths.txt"
    reference_paths.write_text("".join(f"/select/{row_id}\n" for row_id in reference_ids))
    body_file = run.work_dir / "order.json"
    body_file.write_bytes(ORDER_BODY_BYTES)
    await checks.quiesce(run.database)
    return Inputs(
        urls=server_urls(run),
        reader_token=reader.token,
        writer_token=writer.token,
        writer_id=writer.user_id,
        cached_order_id=order_ids[0],
        order_paths_file=order_paths,
        reference_paths_file=reference_paths,
        body_file=body_file,
        body=ORDER_BODY_BYTES,
    )


async def probe_once(run: Run, result: ScenarioResult) -> None:
    """Check the scenario's request is answered as it should be, the first time it runs."""
    if result.probed:
        return
    result.probed = True
    scenario = result.scenario
    server = run.servers[scenario.server]
    async with httpx.AsyncClient(timeout=10.0) as client:
        problems = await checks.probe(client, server.url, scenario.probe)
    result.problems.extend(problems)
    for problem in problems:
        log(f"probe {scenario.key}: {problem}")
    if any("answered 5" in problem for problem in problems):
        log(f"{scenario.server} log:\n{server.log_tail()}")


async def drive(run: Run, scenario: Scenario, seconds: float) -> WrkResult:
    return await asyncio.to_thread(
        run_wrk,
        run.wrk,
        scenario.load,
        seconds=seconds,
        connections=scenario.connections,
        threads=run.config.threads,
    )


async def run_round(
    run: Run, number: int, results: dict[str, ScenarioResult], inputs: Inputs
) -> None:
    for result in results.values():
        name = result.scenario.server
        if name in run.servers:
            await measure_scenario(run, number, result, inputs)
            continue
        async with deployment_copy(run, name):
            await probe_once(run, result)
            if run.config.warmup:
                await drive(run, result.scenario, run.config.warmup)
            await measure_scenario(run, number, result, inputs)
    await checks.quiesce(run.database)


async def measure_scenario(run: Run, number: int, result: ScenarioResult, inputs: Inputs) -> None:
    """One timed wrk run of the scenario, with the checks around it."""
    scenario = result.scenario
    writes = scenario.load.body_file is not None and scenario.server in ("service", "pgbouncer")
    before = await checks.count_orders(run.database, inputs.writer_id) if writes else 0
    sessions = {os.getsid(0), *(server.process.pid for server in run.servers.values())}
    cpu_before = checks.cpu_sample(sessions, run.settings.POSTGRES_DB)
    outcome = await drive(run, scenario, run.config.duration)
    cores, top = checks.other_work(
        cpu_before, checks.cpu_sample(sessions, run.settings.POSTGRES_DB)
    )
    reader = run.lags.get(scenario.server)
    # wrk's window: it ran for `seconds` of wall time just before now.
    lag = reader.window(cpu_before.at, time.monotonic()) if reader else None
    result.rounds.append(outcome)
    result.loads.append(round(os.getloadavg()[0], 2))
    result.other_cores.append(round(cores, 2))
    result.other_top.append(top)
    result.lags.append(lag)
    errors = f", {outcome.error_count} errors {outcome.errors}" if outcome.error_count else ""
    log(
        f"round {number}/{run.config.rounds} {scenario.title}: {outcome.rps:,.0f} req/s, "
        f"p50 {outcome.p50_ms:.2f} ms, p99 {outcome.p99_ms:.2f} ms, "
        f"other work {cores:.2f} cores ({', '.join(top) or '-'}){errors}"
    )
    if lag is not None:
        log(f"  {scenario.server}: {lag.text()}")
    if outcome.errors.get("status") and not result.notes:
        # The first failing round shows why, from the server's own log.
        tail = run.servers[scenario.server].log_tail(6)
        result.notes.append(f"{scenario.server} log: {tail[-600:]}")
        log(f"{scenario.server} log tail:\n{tail}")
    if writes:
        await checks.check_created(
            run.database, result, user_id=inputs.writer_id, before=before, outcome=outcome
        )
    await asyncio.sleep(PAUSE_BETWEEN_RUNS)


async def profile_pass(run: Run, scenarios: list[Scenario]) -> None:
    """py-spy flame graphs of the service's processes under its main scenarios (not figures)."""
    binary = shutil.which("py-spy")
    if binary is None:
        log("profile: py-spy is not on PATH (uv run --with py-spy python -m bench); skipped")
        return
    out_dir = report.RESULTS_DIR / "profiles"
    out_dir.mkdir(parents=True, exist_ok=True)
    service = run.servers["service"]
    for scenario in (item for item in scenarios if item.key in PROFILED):
        svg = out_dir / f"{scenario.key}.svg"
        recorder = _record(binary, service.process.pid, run.config.duration, svg)
        await drive(run, scenario, run.config.duration)
        _, stderr = await asyncio.to_thread(recorder.communicate, timeout=60)
        if recorder.returncode != 0 or not svg.exists():
            log(f"profile {scenario.key}: py-spy failed: {stderr.decode().strip()[-200:]}")
        else:
            log(f"profile {scenario.key}: {svg.relative_to(environment.ROOT)}")
        await checks.quiesce(run.database)


def _record(binary: str, pid: int, seconds: float, svg: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling the process tree of `pid` for `seconds` without pausing it."""
    command = [binary, "record", f"--pid={pid}", "--subprocesses", "--nonblocking"]
    command += ["--rate=200", f"--duration={max(1, round(seconds))}"]
    command += ["--format=flamegraph", f"--output={svg}"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def measure_outbox(run: Run, comparison: Comparison) -> ComparisonResult:
    """The outbox drain against a raw batched-confirm publish, from `bench/outbox_drain.py`."""
    events = run.config.outbox_backlog
    log(f"outbox drain: backlog of {events} events, relay vs raw aio-pika publish")
    rates: dict[str, float] | None = None
    for attempt in (1, 2):
        try:
            rates = await measure_outbox_drain(
                events=events, rounds=run.config.rounds, base=run.settings
            )
            break
        except Exception as exc:  # the HTTP figures are kept whatever happens here
            log(f"outbox drain failed: {type(exc).__name__}: {exc}")
            if attempt == 2 or not await wait_for_rabbitmq(run.settings):
                return ComparisonResult(comparison, None, False, f"failed: {type(exc).__name__}")
            log("outbox drain: RabbitMQ answers again; trying once more")
    assert rates is not None
    relay, raw = rates["relay_events_per_s"], rates["raw_events_per_s"]
    detail = f"{relay:,.0f} vs {raw:,.0f} events/s"
    log(f"outbox drain: {detail}")
    return ComparisonResult(comparison, relay / raw if raw else None, bool(raw), detail)


async def wait_for_rabbitmq(settings: Settings, timeout: float = 60.0) -> bool:
    """Whether RabbitMQ's port answers within `timeout` (it may be restarting under a test)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(settings.RMQ_HOST, settings.RMQ_PORT), 2
            )
        except (OSError, TimeoutError):
            await asyncio.sleep(2)
            continue
        writer.close()
        # The port opens before the broker accepts connections.
        await asyncio.sleep(5)
        return True
    return False


def publish(
    run: Run,
    results: list[ScenarioResult],
    comparisons: list[ComparisonResult],
    machine: dict[str, Any],
) -> None:
    config = run.config
    print(report.render_table(results, comparisons, machine))
    payload = {
        "machine": machine,
        "config": {
            "duration_seconds": config.duration,
            "rounds": config.rounds,
            "warmup_seconds": config.warmup,
            "connections": config.connections,
            "low_connections": config.low_connections,
            "wrk_threads": config.threads,
            "workers": config.workers,
            "seeded_orders": config.orders,
            "outbox_backlog": config.outbox_backlog,
            "loop_lag_sampled": bool(config.loop_lag),
            "gc_freeze": os.environ.get("BENCH_GC_FREEZE") == "1",
            "scenarios": config.scenarios or "all",
            "statistic": "median of rounds",
        },
        "scenarios": [result.to_json() for result in results],
        "comparisons": [item.to_json() for item in comparisons],
    }
    json_path = report.RESULTS_DIR / "latest.json"
    report.write_json(json_path, payload)
    png_path = report.RESULTS_DIR / "latest.png"
    if report.write_chart(png_path, payload):
        log(f"wrote {json_path.relative_to(environment.ROOT)} and {png_path.name}")
    else:
        log(
            f"wrote {json_path.relative_to(environment.ROOT)}; no chart: matplotlib is missing "
            "(uv run --group bench python -m bench.report draws it from latest.json)"
        )
