"""The soak (`make bench SOAK=600`): mixed traffic at half the capacity for a long while.

Runs instead of the ratios, on the recommended deployment: `python -m api` (WORKERS
processes, relay and status consumer off) beside `python -m api.worker` (relay and
status consumer). Steps:

1. seed 16 users and 32 orders of each (traffic goes to the users in turn: one user
   writing all the time would keep its cached reads stale);
2. measure the capacity: `bench/wrk/soak.lua` (reads, creates, cancels) as fast as the
   service answers for 10 s, then set the connections' think time so the rate is
   BENCH_SOAK_LOAD (0.5) of it, checked in a 5 s run;
3. run it for SOAK seconds, in intervals of a minute (a quarter of the soak when it is
   shorter than three minutes). Meanwhile this process plays the payment processor:
   every kept order gets `paid` then `shipped` on the status queue, as
   `examples/status_publisher.py` sends them; and a downstream consumer: the events
   queue is emptied every 2 s;
4. report per interval: req/s, p50/p99, errors, the outbox backlog (at the end and
   the highest seen), the status queue's depth, events delivered, and the RSS
   (`/proc/<pid>/status` VmRSS) of every process of the two process groups;
5. fail (exit 1) when a process's RSS grew more than 10 % from the end of the first
   interval to the end, when the last interval's p99 is more than twice the first's,
   when the set of processes changed (a worker died), or when more than 0.1 % of the
   requests failed. `bench/results/soak.json` keeps it all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aio_pika
import asyncpg
import orjson

from bench import report, servers
from bench.environment import ROOT
from bench.progress import log
from bench.seed import ORDER_BODY, create_orders, register_and_login, service_client
from bench.servers import Deployment, Server
from bench.wrk_runner import Load, WrkResult, run_wrk

if TYPE_CHECKING:
    from bench.runner import Run

USERS = 16
ORDERS_PER_USER = 32
CAPACITY_SECONDS = 10
CALIBRATION_SECONDS = 5
MONITOR_EVERY = 2.0
STATUS_POLL_EVERY = 1.0
# Limits of the verdict.
RSS_GROWTH = 0.10
P99_DRIFT = 2.0
ERROR_SHARE = 0.001
API_OFF = {"OUTBOX_RELAY_ENABLED": "false", "STATUS_CONSUMER_ENABLED": "false"}
STATUSES = ("paid", "shipped")


@dataclass
class Interval:
    number: int
    wrk: WrkResult
    backlog_end: int
    backlog_max: int
    status_queue: int
    events: int
    rss_kib: dict[str, int]


@dataclass
class Monitor:
    """What the background task saw since the last interval ended."""

    backlog: int = 0
    backlog_max: int = 0
    status_queue: int = 0
    dead_letters: int = 0
    events: int = 0
    statuses_sent: int = 0
    problems: list[str] = field(default_factory=list)

    def take(self) -> tuple[int, int, int, int]:
        taken = (self.backlog, self.backlog_max, self.status_queue, self.events)
        self.backlog_max, self.events = self.backlog, 0
        return taken


class ProcessTree:
    """The processes of one started process group, labelled the first time each is seen."""

    def __init__(self, name: str, server: Server) -> None:
        self.name = name
        self.leader = server.process.pid
        self.labels: dict[int, str] = {}
        self.children = 0

    def rss_kib(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                if int(stat.rpartition(") ")[2].split()[3]) != self.leader:
                    continue
                status = (entry / "status").read_text()
            except (OSError, IndexError):
                continue
            rss = next((line for line in status.splitlines() if line.startswith("VmRSS:")), "")
            if not rss:
                continue  # a zombie
            pid = int(entry.name)
            if pid not in self.labels:
                self.labels[pid] = self._label(pid, entry)
            found[self.labels[pid]] = int(rss.split()[1])
        return found

    def _label(self, pid: int, entry: Path) -> str:
        if pid == self.leader:
            return self.name
        with contextlib.suppress(OSError):
            if b"resource_tracker" in (entry / "cmdline").read_bytes():
                return f"{self.name}.tracker"
        self.children += 1
        return f"{self.name}.w{self.children}"


async def run_soak(run: Run, machine: dict[str, Any]) -> int:
    config = run.config
    interval = config.soak_interval
    if config.soak < 3 * interval:
        interval = max(5, config.soak // 4)
    count = max(1, round(config.soak / interval))
    api, worker = await _start(run)
    trees = [ProcessTree("api", api), ProcessTree("worker", worker)]
    log(f"soak: seeding {USERS} users and {ORDERS_PER_USER} orders of each")
    async with service_client(api.url) as client:
        users = await asyncio.gather(
            *(register_and_login(client, f"soaker{n}", run.names.suffix) for n in range(USERS))
        )
        orders = [await create_orders(client, user, ORDERS_PER_USER) for user in users]
    tokens = run.work_dir / "soak-tokens.txt"
    tokens.write_text("".join(f"{user.user_id} {user.token}\n" for user in users))
    paths = run.work_dir / "soak-paths.txt"
    # Round robin: line k is an order of user (k - 1) % USERS + 1, as soak.lua expects.
    paths.write_text(
        "".join(f"/v1/orders/{ids[k]}\n" for k in range(ORDERS_PER_USER) for ids in orders)
    )
    body = run.work_dir / "soak-order.json"
    body.write_bytes(orjson.dumps({**ORDER_BODY, "metadata": {"channel": "bench", "soak": "keep"}}))

    def load(delay_ms: float) -> Load:
        env = {"BENCH_DELAY_MS": f"{delay_ms:.1f}"} if delay_ms else {}
        return Load(
            url=api.url + "/",
            script="soak.lua",
            paths_file=paths,
            body_file=body,
            env={"BENCH_TOKENS_FILE": str(tokens), **env},
        )

    async def drive(delay_ms: float, seconds: float) -> WrkResult:
        return await asyncio.to_thread(
            run_wrk,
            run.wrk,
            load(delay_ms),
            seconds=seconds,
            connections=config.connections,
            threads=config.threads,
        )

    probe = await drive(0, CAPACITY_SECONDS)
    capacity = probe.rps
    log(
        f"soak: as fast as it answers: {capacity:,.0f} req/s, p50 {probe.p50_ms:.1f} ms, "
        f"p99 {probe.p99_ms:.1f} ms, errors {probe.errors}, sent {probe.extra}"
    )
    target = capacity * config.soak_load
    # Each connection: answer time + think time per request. Take the answer time from a
    # first paced run, then set the think time for the target rate.
    period_ms = config.connections / target * 1000
    first = await drive(period_ms, CALIBRATION_SECONDS)
    answer_ms = max(0.0, config.connections / max(first.rps, 1e-9) * 1000 - period_ms)
    delay_ms = max(1.0, period_ms - answer_ms)
    log(
        f"soak: capacity {capacity:,.0f} req/s; target {target:,.0f} req/s "
        f"({config.soak_load:.0%}): {config.connections} connections, think time "
        f"{delay_ms:.1f} ms (a paced probe did {first.rps:,.0f} req/s); "
        f"{count} intervals of {interval}s"
    )

    start_rss = {label: rss for tree in trees for label, rss in (tree.rss_kib()).items()}
    monitor = Monitor()
    since = await run.database.fetchval("SELECT now()")
    tasks = [
        asyncio.create_task(_monitor(run, monitor)),
        asyncio.create_task(_processor(run, since, monitor)),
    ]
    intervals: list[Interval] = []
    try:
        for number in range(1, count + 1):
            outcome = await drive(delay_ms, interval)
            backlog, backlog_max, status_queue, events = monitor.take()
            rss = {label: kib for tree in trees for label, kib in tree.rss_kib().items()}
            intervals.append(
                Interval(number, outcome, backlog, backlog_max, status_queue, events, rss)
            )
            log(
                f"soak {number}/{count}: {outcome.rps:,.0f} req/s, p99 {outcome.p99_ms:.1f} ms, "
                f"{outcome.error_count} errors, outbox {backlog} (max {backlog_max}), "
                f"status queue {status_queue}, RSS "
                + ", ".join(f"{label} {kib / 1024:.0f}" for label, kib in rss.items())
                + " MiB"
            )
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    failures = verdict(intervals, start_rss, monitor)
    print(render(intervals, start_rss, monitor, failures, capacity, target, machine))
    payload = {
        "machine": machine,
        "config": {
            "soak_seconds": config.soak,
            "interval_seconds": interval,
            "workers": config.workers,
            "connections": config.connections,
            "capacity_requests_per_second": round(capacity, 1),
            "target_requests_per_second": round(target, 1),
            "think_time_ms": round(delay_ms, 1),
        },
        "rss_start_kib": start_rss,
        "intervals": [asdict(item) for item in intervals],
        "statuses_sent": monitor.statuses_sent,
        "dead_letters": monitor.dead_letters,
        "problems": monitor.problems,
        "failures": failures,
    }
    path = report.RESULTS_DIR / "soak.json"
    report.write_json(path, payload)
    log(f"wrote {path.relative_to(ROOT)}")
    return 1 if failures else 0


async def _start(run: Run) -> tuple[Server, Server]:
    """The API without relay and consumer, and `python -m api.worker` with them."""
    api = Deployment("api", run.config.workers, overrides=API_OFF)
    worker = Deployment("worker", 1, module="api.worker")
    log(f"soak: starting python -m api ({api.workers} workers) and python -m api.worker")
    for deployment in (api, worker):
        run.servers[deployment.name] = servers.start_service(deployment, run.base_env, run.work_dir)
    await asyncio.to_thread(run.servers["api"].wait_ready, "/ping")
    await asyncio.to_thread(run.servers["worker"].wait_ready, "/livez")
    return run.servers["api"], run.servers["worker"]


async def _monitor(run: Run, monitor: Monitor) -> None:
    """Every 2 s: the outbox backlog, the queues' depths; empty the events queue."""
    settings = run.settings
    connection = await aio_pika.connect(settings.rabbitmq_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        events = await channel.get_queue(settings.RMQ_QUEUE, ensure=False)
        while True:
            try:
                backlog = int(
                    await run.database.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
                )
                monitor.backlog = backlog
                monitor.backlog_max = max(monitor.backlog_max, backlog)
                purged = await events.purge()
                monitor.events += int(getattr(purged, "message_count", 0) or 0)
                status = await channel.declare_queue(settings.RMQ_STATUS_QUEUE, passive=True)
                monitor.status_queue = int(status.declaration_result.message_count or 0)
                dead = await channel.declare_queue(f"{settings.RMQ_STATUS_QUEUE}.dlq", passive=True)
                monitor.dead_letters = int(dead.declaration_result.message_count or 0)
            except Exception as exc:  # noted, and the soak goes on
                _note(monitor, f"monitor: {type(exc).__name__}: {exc}")
                if channel.is_closed:
                    channel = await connection.channel()
                    events = await channel.get_queue(settings.RMQ_QUEUE, ensure=False)
            await asyncio.sleep(MONITOR_EVERY)


async def _processor(run: Run, since: datetime, monitor: Monitor) -> None:
    """A payment processor: `paid` then `shipped` for every kept order, as they appear."""
    settings = run.settings
    query = (
        "SELECT id, created_at FROM orders WHERE created_at >= $1 "
        "AND metadata->>'soak' = 'keep' ORDER BY created_at LIMIT 5000"
    )
    database = await asyncpg.connect(run.database.dsn)
    connection = await aio_pika.connect(settings.rabbitmq_url, timeout=10)
    seen: set[uuid.UUID] = set()
    try:
        channel = await connection.channel(publisher_confirms=True)
        while True:
            rows = [row for row in await database.fetch(query, since) if row["id"] not in seen]
            if rows:
                since = rows[-1]["created_at"]
                # Ids at the newest timestamp come again with `>=`; older ones never do.
                seen = {row["id"] for row in rows if row["created_at"] == since}
            for status in STATUSES:
                # Every `paid` is confirmed before its `shipped` goes out: in order per order.
                queue = settings.RMQ_STATUS_QUEUE
                await asyncio.gather(*(_publish(channel, queue, row["id"], status) for row in rows))
                monitor.statuses_sent += len(rows)
            await asyncio.sleep(STATUS_POLL_EVERY)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        _note(monitor, f"processor stopped: {type(exc).__name__}: {exc}")
    finally:
        with contextlib.suppress(Exception):
            await connection.close()
        await database.close()


async def _publish(channel: Any, queue: str, order_id: uuid.UUID, status: str) -> None:
    body = {"order_id": str(order_id), "status": status, "reason": "soak"}
    await channel.default_exchange.publish(
        aio_pika.Message(
            json.dumps(body).encode(),
            content_type="application/json",
            message_id=f"soak-{order_id}-{status}",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        ),
        routing_key=queue,
        mandatory=True,
    )


def _note(monitor: Monitor, problem: str) -> None:
    if problem not in monitor.problems:
        monitor.problems.append(problem)
        log(f"soak: {problem}")


def verdict(intervals: list[Interval], start_rss: dict[str, int], monitor: Monitor) -> list[str]:
    """Why the soak failed; empty when it passed."""
    if not intervals:
        return ["no interval ran"]
    failures: list[str] = []
    first, last = intervals[0], intervals[-1]
    for label in sorted(set(first.rss_kib) | set(last.rss_kib) | set(start_rss)):
        base, end = first.rss_kib.get(label), last.rss_kib.get(label)
        if base is None or end is None or label not in start_rss:
            failures.append(f"{label}: not there for the whole soak (a process died or started)")
        elif end > base * (1 + RSS_GROWTH):
            failures.append(
                f"{label}: RSS grew {end / base - 1:.0%} after the first interval "
                f"({base / 1024:.0f} -> {end / 1024:.0f} MiB; limit {RSS_GROWTH:.0%})"
            )
    if first.wrk.p99_ms and last.wrk.p99_ms > P99_DRIFT * first.wrk.p99_ms:
        failures.append(
            f"p99 drifted {last.wrk.p99_ms / first.wrk.p99_ms:.1f}x "
            f"({first.wrk.p99_ms:.1f} -> {last.wrk.p99_ms:.1f} ms; limit {P99_DRIFT:g}x)"
        )
    requests = sum(item.wrk.requests for item in intervals)
    errors = sum(item.wrk.error_count for item in intervals)
    if errors > ERROR_SHARE * max(requests, 1):
        failures.append(f"{errors} of {requests} requests failed (limit {ERROR_SHARE:.1%})")
    return failures


def render(
    intervals: list[Interval],
    start_rss: dict[str, int],
    monitor: Monitor,
    failures: list[str],
    capacity: float,
    target: float,
    machine: dict[str, Any],
) -> str:
    labels = list(start_rss)
    lines = [
        f"machine: {machine.get('cpu_model')} x{machine.get('nproc')}, "
        f"python {machine.get('python')}, {machine.get('date')}",
        f"soak: capacity {capacity:,.0f} req/s, target {target:,.0f} req/s; "
        "outbox: unsent events at the interval's end (highest seen); RSS in MiB",
        "",
        f"{'interval':>8}{'req/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'errors':>8}{'outbox':>14}"
        f"{'status q':>9}{'events':>8}  " + "".join(f"{label:>12}" for label in labels),
        f"{'start':>8}{'':>62}  {_mib(start_rss, labels)}",
    ]
    lines.extend(
        f"{item.number:>8}{item.wrk.rps:>8.0f}{item.wrk.p50_ms:>8.1f}{item.wrk.p99_ms:>8.1f}"
        f"{item.wrk.error_count:>8}{f'{item.backlog_end} ({item.backlog_max})':>14}"
        f"{item.status_queue:>9}{item.events:>8}  {_mib(item.rss_kib, labels)}"
        for item in intervals
    )
    mix = intervals[-1].wrk.extra if intervals else None
    lines += [
        "",
        f"last interval's requests by kind: {mix}" if mix else "",
        f"status messages sent: {monitor.statuses_sent}; dead-lettered: {monitor.dead_letters}",
        *(f"note: {problem}" for problem in monitor.problems),
        "",
        "soak: PASSED" if not failures else "soak: FAILED",
        *(f"  {failure}" for failure in failures),
    ]
    return "\n".join(lines)


def _mib(rss_kib: dict[str, int], labels: list[str]) -> str:
    return "".join(
        f"{rss_kib[label] / 1024:>12.1f}" if label in rss_kib else f"{'-':>12}" for label in labels
    )
