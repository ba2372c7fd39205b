"""Private PostgreSQL servers for the tests: a primary, a streaming standby, a PgBouncer.

Started from the installed PostgreSQL 15 binaries as the unprivileged `postgres` user,
with their own data directories in a temporary directory and only loopback ports of
their own (5441, 5442, 6441); the machine's cluster on 5432 is never touched. Every
process started here is stopped by `stop_all`, also after a failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PRIMARY_PORT = 5441
STANDBY_PORT = 5442
PGBOUNCER_PORT = 6441
PGBOUNCER_POOL_SIZE = 2
RUN_AS = "postgres"


def _as_owner(argv: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run as `postgres` when we are root."""
    return ["runuser", "-u", RUN_AS, "--", *argv] if os.geteuid() == 0 else argv


def _run(argv: list[str], *, timeout: float = 60) -> str:
    done = subprocess.run(
        _as_owner(argv), capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {done.stdout}{done.stderr}")
    return done.stdout


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@dataclass
class Node:
    """One PostgreSQL server: its data directory and port."""

    datadir: Path
    port: int
    options: list[str]
    pids: set[int] = field(default_factory=set)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        opts = " ".join(f"-c {option}" for option in self.options)
        log = self.datadir.parent / f"{self.datadir.name}.log"
        try:
            self._pg_ctl_start(opts, log)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{log.read_text(errors='replace')[-2000:]}") from None
        self.pids.add(self.postmaster_pid())

    def _pg_ctl_start(self, opts: str, log: Path) -> None:
        _run(
            [
                str(PG_BIN / "pg_ctl"),
                "-D",
                str(self.datadir),
                "-l",
                str(log),
                "-o",
                f"-c port={self.port} {opts}",
                "-w",
                "-t",
                "30",
                "start",
            ]
        )

    def postmaster_pid(self) -> int:
        return int((self.datadir / "postmaster.pid").read_text().split()[0])

    def kill_postmaster(self) -> None:
        """`kill -9` of the postmaster only, as a crashed machine's primary would vanish."""
        pid = self.postmaster_pid()
        self.pids.update(_children(pid))
        _kill(pid)

    def promote(self) -> None:
        _run([str(PG_BIN / "pg_ctl"), "-D", str(self.datadir), "-w", "-t", "30", "promote"])

    def stop(self) -> None:
        subprocess.run(
            _as_owner([str(PG_BIN / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "stop"]),
            capture_output=True,
            timeout=30,
            check=False,
        )
        for pid in self.pids:
            self.pids.update(_children(pid))
        for pid in self.pids:
            _kill(pid)


class PrivateCluster:
    """A primary (and optionally a synchronous standby and a PgBouncer) of our own."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="orders-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.root, RUN_AS, RUN_AS)
        self.nodes: list[Node] = []
        self.pgbouncer: subprocess.Popen[bytes] | None = None
        self.primary: Node | None = None
        self.standby: Node | None = None

    def _common(self) -> list[str]:
        return [
            "listen_addresses=127.0.0.1",
            f"unix_socket_directories={self.root}",
            "fsync=off",  # a killed process, not a crashed machine: the page cache survives
            "shared_buffers=32MB",
            "max_connections=200",
        ]

    def start_primary(self, *, synchronous: bool) -> Node:
        datadir = self.root / "primary"
        _run([str(PG_BIN / "initdb"), "-D", str(datadir), "-U", "postgres", "--auth=trust", "-N"])
        with (datadir / "pg_hba.conf").open("a") as hba:
            hba.write("host replication all 127.0.0.1/32 trust\n")
        options = [*self._common(), "wal_level=replica", "max_wal_senders=5"]
        if synchronous:
            options.append("synchronous_standby_names='*'")
        node = Node(datadir, PRIMARY_PORT, options)
        node.start()
        self.nodes.append(node)
        self.primary = node
        return node

    def start_standby(self) -> Node:
        assert self.primary is not None
        datadir = self.root / "standby"
        _run(
            [
                str(PG_BIN / "pg_basebackup"),
                "-h",
                "127.0.0.1",
                "-p",
                str(PRIMARY_PORT),
                "-U",
                "postgres",
                "-D",
                str(datadir),
                "-R",
                "-X",
                "stream",
            ]
        )
        # Promoted, it must not wait for a standby of its own.
        node = Node(datadir, STANDBY_PORT, [*self._common(), "synchronous_standby_names=''"])
        node.start()
        self.nodes.append(node)
        self.standby = node
        return node

    def wait_synchronous(self, timeout: float = 30) -> None:
        """Until the primary reports its standby as synchronous."""
        assert self.primary is not None
        query = "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.psql(self.primary, query).strip() == "1":
                return
            time.sleep(0.2)
        raise RuntimeError("the standby did not become synchronous")

    def psql(self, node: Node, sql: str, database: str = "postgres") -> str:
        return _run(
            [
                str(PG_BIN / "psql"),
                "-h",
                "127.0.0.1",
                "-p",
                str(node.port),
                "-U",
                "postgres",
                "-d",
                database,
                "-AtXq",
                "-c",
                sql,
            ]
        )

    def start_pgbouncer(self) -> str:
        """PgBouncer in transaction mode in front of the primary; returns its `host:port`."""
        ini = self.root / "pgbouncer.ini"
        users = self.root / "userlist.txt"
        users.write_text('"postgres" ""\n')
        ini.write_text(
            "\n".join(
                [
                    "[databases]",
                    f"* = host=127.0.0.1 port={PRIMARY_PORT}",
                    "[pgbouncer]",
                    "listen_addr = 127.0.0.1",
                    f"listen_port = {PGBOUNCER_PORT}",
                    f"unix_socket_dir = {self.root}",
                    "auth_type = trust",
                    f"auth_file = {users}",
                    "pool_mode = transaction",
                    # Fewer server connections than client processes: clients share them.
                    f"default_pool_size = {PGBOUNCER_POOL_SIZE}",
                    "max_client_conn = 1000",
                    "max_db_connections = 0",
                    f"logfile = {self.root / 'pgbouncer.log'}",
                    "",
                ]
            )
        )
        if os.geteuid() == 0:
            for path in (ini, users):
                shutil.chown(path, RUN_AS, RUN_AS)
        # `-u`: PgBouncer drops root itself, so the process we wait for is PgBouncer's own.
        user = ["-u", RUN_AS] if os.geteuid() == 0 else []
        self.pgbouncer = subprocess.Popen(
            ["pgbouncer", *user, str(ini)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                self.psql(Node(self.root, PGBOUNCER_PORT, []), "SELECT 1")
                return f"127.0.0.1:{PGBOUNCER_PORT}"
            except RuntimeError:
                if self.pgbouncer.poll() is not None:
                    log = (self.root / "pgbouncer.log").read_text(errors="replace")
                    raise RuntimeError(f"pgbouncer exited: {log[-2000:]}") from None
                time.sleep(0.2)
        raise RuntimeError("pgbouncer did not answer")

    def stop_all(self) -> None:
        if self.pgbouncer is not None:
            self.pgbouncer.terminate()
            try:
                self.pgbouncer.wait(10)
            except subprocess.TimeoutExpired:
                self.pgbouncer.kill()
                self.pgbouncer.wait(10)
            self.pgbouncer = None
        for node in self.nodes:
            node.stop()
        self.nodes.clear()
        shutil.rmtree(self.root, ignore_errors=True)
