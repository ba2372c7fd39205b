"""Private Redis deployments for the topology tests, from the installed `redis-server`.

Session-scoped fixtures start them on the loopback ports reserved for these tests and
stop them in teardown: a 6-node cluster (17001-17006, bus ports +10000), a Sentinel
set (primary 17101, replica 17102, sentinels 17111-17113) and a TLS standalone (17201).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HOST = "127.0.0.1"
CLUSTER_PORTS = tuple(range(17001, 17007))
SENTINEL_PRIMARY, SENTINEL_REPLICA = 17101, 17102
SENTINEL_PORTS = (17111, 17112, 17113)
TLS_PORT = 17201
SENTINEL_MASTER = "mymaster"


def cli(port: int, *args: str, tls: list[str] | None = None, timeout: float = 5) -> str:
    """`redis-cli` against one of our nodes; its output ('' when it does not answer)."""
    result = subprocess.run(
        ["redis-cli", "-h", HOST, "-p", str(port), *(tls or []), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return result.stdout.strip()


def _answers(port: int) -> bool:
    return cli(port, "PING", timeout=2) == "PONG"


def _clear_port(port: int) -> None:
    """A server left on one of our reserved ports by an aborted run of these tests."""
    if _answers(port):
        cli(port, "SHUTDOWN", "NOSAVE")


def _wait(predicate: object, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():  # type: ignore[operator]
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{what} not within {timeout}s")
        time.sleep(0.1)
    return time.monotonic() - started


@dataclass
class Node:
    port: int
    directory: Path
    args: list[str]

    @property
    def pidfile(self) -> Path:
        return self.directory / "redis.pid"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                "redis-server",
                *self.args,
                "--daemonize",
                "yes",
                "--dir",
                str(self.directory),
                "--pidfile",
                str(self.pidfile),
                "--logfile",
                str(self.directory / "redis.log"),
            ],
            check=True,
            timeout=10,
        )

    def pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int(self.pidfile.read_text().strip())
        return None

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            if sig is signal.SIGKILL:
                self.pidfile.unlink(missing_ok=True)

    def stop(self) -> None:
        """Killed outright: nothing of these test servers is worth saving."""
        pid = self.pid()
        self.kill(signal.SIGKILL)
        if pid is not None:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.02)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper is gone for our purposes)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@dataclass
class Deployment:
    nodes: list[Node] = field(default_factory=list)
    root: Path | None = None

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


# --- cluster ---------------------------------------------------------------------------


@dataclass
class ClusterServers(Deployment):
    @property
    def seeds(self) -> str:
        return ",".join(f"{HOST}:{port}" for port in CLUSTER_PORTS[:3])

    def node(self, port: int) -> Node:
        return next(node for node in self.nodes if node.port == port)

    def state_ok(self, port: int | None = None) -> bool:
        ports = [port] if port else [n.port for n in self.nodes if n.pid() is not None]
        return all("cluster_state:ok" in cli(p, "CLUSTER", "INFO", timeout=2) for p in ports)

    def primary_of(self, key: str) -> int | None:
        """The port of the healthy primary serving `key`'s slot now (None during a failover)."""
        for node in self.nodes:
            if node.pid() is None:
                continue
            slot = cli(node.port, "CLUSTER", "KEYSLOT", key)
            for line in cli(node.port, "CLUSTER", "NODES").splitlines():
                fields = line.split()
                if "master" not in fields[2] or "fail" in fields[2]:
                    continue
                for span in fields[8:]:
                    low, _, high = span.partition("-")
                    if low.isdigit() and int(low) <= int(slot) <= int(high or low):
                        return int(fields[1].split(":")[1].split("@")[0])
        return None

    def replicas_in_sync(self) -> bool:
        for node in self.nodes:
            if node.pid() is None:
                continue
            info = cli(node.port, "INFO", "replication")
            if "role:slave" in info and "master_link_status:up" not in info:
                return False
        return True

    def restart(self, port: int) -> None:
        """Bring a killed node back; it rejoins from its config file as a replica."""
        self.node(port).start()
        _wait(lambda: self.state_ok(), 20, "cluster_state:ok on every node")
        _wait(self.replicas_in_sync, 20, "replicas in sync")


def start_cluster(root: Path) -> ClusterServers:
    cluster = ClusterServers(root=root)
    for port in CLUSTER_PORTS:
        _clear_port(port)
        node = Node(
            port,
            root / str(port),
            [
                "--port",
                str(port),
                "--bind",
                HOST,
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(root / str(port) / "nodes.conf"),
                "--cluster-node-timeout",
                "2000",
                "--save",
                "",
                "--appendonly",
                "no",
                "--repl-diskless-sync-delay",
                "0",
            ],
        )
        cluster.nodes.append(node)
        node.start()
    try:
        for port in CLUSTER_PORTS:
            _wait(lambda port=port: _answers(port), 10, f"redis on {port}")
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"{HOST}:{port}" for port in CLUSTER_PORTS),
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        _wait(lambda: cluster.state_ok(), 20, "cluster_state:ok")
        # A replica that has not synced yet cannot take over: wait for every link.
        _wait(cluster.replicas_in_sync, 20, "replicas in sync")
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterServers]:
    cluster = start_cluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield cluster
    finally:
        cluster.stop()


# --- sentinel --------------------------------------------------------------------------


@dataclass
class SentinelServers(Deployment):
    @property
    def sentinels(self) -> str:
        return ",".join(f"{HOST}:{port}" for port in SENTINEL_PORTS)

    def primary_port(self) -> int | None:
        """The primary the sentinels name now."""
        for port in SENTINEL_PORTS:
            answer = cli(
                port, "SENTINEL", "get-master-addr-by-name", SENTINEL_MASTER, timeout=2
            ).split()
            if len(answer) == 2:
                return int(answer[1])
        return None

    def node(self, port: int) -> Node:
        return next(node for node in self.nodes if node.port == port)


def start_sentinel(root: Path) -> SentinelServers:
    deployment = SentinelServers(root=root)
    data = ["--bind", HOST, "--save", "", "--appendonly", "no"]
    for port in (SENTINEL_PRIMARY, SENTINEL_REPLICA, *SENTINEL_PORTS):
        _clear_port(port)
    data += ["--repl-diskless-sync-delay", "0"]
    primary = Node(SENTINEL_PRIMARY, root / "primary", ["--port", str(SENTINEL_PRIMARY), *data])
    replica = Node(
        SENTINEL_REPLICA,
        root / "replica",
        ["--port", str(SENTINEL_REPLICA), "--replicaof", HOST, str(SENTINEL_PRIMARY), *data],
    )
    deployment.nodes += [primary, replica]
    try:
        primary.start()
        replica.start()
        for port in SENTINEL_PORTS:
            directory = root / f"sentinel-{port}"
            directory.mkdir(parents=True)
            config = directory / "sentinel.conf"
            config.write_text(
                f"port {port}\nbind {HOST}\n"
                f"sentinel monitor {SENTINEL_MASTER} {HOST} {SENTINEL_PRIMARY} 2\n"
                f"sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n"
                f"sentinel failover-timeout {SENTINEL_MASTER} 5000\n"
                f"sentinel parallel-syncs {SENTINEL_MASTER} 1\n"
            )
            sentinel = Node(port, directory, [str(config), "--sentinel"])
            deployment.nodes.append(sentinel)
            sentinel.start()
        _wait(
            lambda: "master_link_status:up" in cli(SENTINEL_REPLICA, "INFO", "replication"),
            15,
            "replica in sync",
        )
        _wait(lambda: deployment.primary_port() == SENTINEL_PRIMARY, 15, "sentinels ready")
    except BaseException:
        deployment.stop()
        raise
    return deployment


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelServers]:
    deployment = start_sentinel(tmp_path_factory.mktemp("redis-sentinel"))
    try:
        yield deployment
    finally:
        deployment.stop()


# --- TLS -------------------------------------------------------------------------------


@dataclass
class TlsServer(Deployment):
    ca_file: Path = Path()
    wrong_ca_file: Path = Path()


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}",
    )  # fmt: skip
    return key, cert


def start_tls(root: Path) -> TlsServer:
    root.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _make_ca(root, "orders-test-ca")
    _, wrong_ca = _make_ca(root, "someone-else-ca")
    server_key, server_csr, server_cert = (
        root / "server.key",
        root / "server.csr",
        root / "server.crt",
    )
    extensions = root / "san.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(server_key),
        "-out", str(server_csr), "-subj", "/CN=127.0.0.1",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(server_csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", str(server_cert), "-days", "2", "-extfile", str(extensions),
    )  # fmt: skip
    _clear_tls()
    server = TlsServer(root=root, ca_file=ca_cert, wrong_ca_file=wrong_ca)
    node = Node(
        TLS_PORT,
        root / "data",
        [
            "--port", "0", "--tls-port", str(TLS_PORT), "--bind", HOST,
            "--tls-cert-file", str(server_cert), "--tls-key-file", str(server_key),
            "--tls-ca-cert-file", str(ca_cert), "--tls-auth-clients", "no",
            "--save", "", "--appendonly", "no",
        ],
    )  # fmt: skip
    server.nodes.append(node)
    try:
        node.start()
        _wait(lambda: cli(TLS_PORT, "PING", tls=tls_cli(ca_cert)) == "PONG", 10, "TLS redis")
    except BaseException:
        server.stop()
        raise
    return server


def tls_cli(ca_file: Path) -> list[str]:
    return ["--tls", "--cacert", str(ca_file)]


def _clear_tls() -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        if cli(TLS_PORT, "PING", tls=["--tls", "--insecure"], timeout=2) == "PONG":
            cli(TLS_PORT, "SHUTDOWN", "NOSAVE", tls=["--tls", "--insecure"])


@pytest.fixture(scope="session")
def redis_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    server = start_tls(tmp_path_factory.mktemp("redis-tls"))
    try:
        yield server
    finally:
        server.stop()


def topology_overrides(topology: str, request: pytest.FixtureRequest) -> dict[str, str]:
    """Settings that point the service at `topology` (starting it on first use)."""
    if topology == "cluster":
        cluster: ClusterServers = request.getfixturevalue("redis_cluster")
        return {"REDIS_MODE": "cluster", "REDIS_NODES": cluster.seeds, "REDIS_DB": "0"}
    if topology == "sentinel":
        sentinel: SentinelServers = request.getfixturevalue("redis_sentinel")
        return {
            "REDIS_MODE": "sentinel",
            "REDIS_NODES": sentinel.sentinels,
            "REDIS_SENTINEL_MASTER": SENTINEL_MASTER,
        }
    if topology == "tls":
        tls: TlsServer = request.getfixturevalue("redis_tls")
        return {
            "REDIS_HOST": HOST,
            "REDIS_PORT": str(TLS_PORT),
            "REDIS_TLS": "true",
            "REDIS_TLS_CA_FILE": str(tls.ca_file),
        }
    return {}
