"""A private three-node RabbitMQ cluster on loopback for the scale-out tests.

Each node has its own node name, ports, data and log directories, configuration
files and Erlang cookie (a private HOME), so nothing here can reach or change
the machine's own broker. Nodes are started from the installed server and
stopped (or killed, for failover tests) by the fixture that owns them.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

NODE_PORTS = (5701, 5702, 5703)
DIST_PORTS = (25701, 25702, 25703)
NODE_NAMES = ("orders-t1@localhost", "orders-t2@localhost", "orders-t3@localhost")
COOKIE = "orders-api-test-cluster-cookie"


def _server_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin"))
    if not found:
        raise RuntimeError("no RabbitMQ server under /usr/lib/rabbitmq/lib")
    return Path(found[-1])


@dataclass
class Node:
    index: int
    base: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return NODE_NAMES[self.index]

    @property
    def port(self) -> int:
        return NODE_PORTS[self.index]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.base / "node.pid"

    def env(self) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        return {
            **keep,
            "HOME": str(self.base / "home"),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(DIST_PORTS[self.index]),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(self.base / "rabbitmq-env.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.base / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_CTL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def prepare(self) -> None:
        home = self.base / "home"
        for directory in (home, self.base / "mnesia", self.base / "log"):
            directory.mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text(COOKIE)
        cookie.chmod(0o400)
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
            "loopback_users = none\n"
            "log.console = false\n"
            "log.file.level = warning\n"
        )
        (self.base / "rabbitmq-env.conf").write_text("")
        (self.base / "advanced.config").write_text("[].\n")
        (self.base / "enabled_plugins").write_text("[].\n")

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """`rabbitmqctl -n <this node> ...`; raises with its output when it fails."""
        result = subprocess.run(
            [str(_server_dir() / "rabbitmqctl"), "-n", self.name, *args],
            env=self.env(),
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl -n {self.name} {' '.join(args)}: "
                f"{(result.stdout + result.stderr).decode(errors='replace')[-2000:]}"
            )
        return result.stdout.decode(errors="replace")

    def launch(self) -> None:
        self.pid_file.unlink(missing_ok=True)
        log = (self.base / "log" / "console.log").open("ab")
        self.process = subprocess.Popen(
            [str(_server_dir() / "rabbitmq-server")],
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def wait_started(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not self.pid_file.exists():
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no pid file after {timeout}s")
            time.sleep(0.2)
        self.ctl("wait", str(self.pid_file), "--timeout", str(int(timeout)), timeout=timeout + 10)
        self.ctl("await_startup", "--timeout", str(int(timeout)), timeout=timeout + 10)

    def kill(self) -> None:
        """SIGKILL the whole node (its Erlang VM and children), as a crash would."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        self.process = None

    def stop(self) -> None:
        """A clean stop; a kill when the node does not stop in time."""
        if self.process is None or self.process.poll() is not None:
            self.process = None
            return
        with contextlib.suppress(Exception):
            self.ctl("stop", timeout=60)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=30)
        self.kill()

    def connection_count(self) -> int:
        """Client connections this node holds now."""
        out = self.ctl("list_connections", "name", "--no-table-headers", "--quiet")
        return len([line for line in out.splitlines() if line.strip()])

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class Cluster:
    base: Path
    nodes: list[Node] = field(default_factory=list)

    @property
    def hosts(self) -> str:
        """The `RMQ_HOSTS` value naming every node."""
        return ",".join(node.address for node in self.nodes)

    def start(self) -> None:
        for index in range(len(NODE_NAMES)):
            node = Node(index, self.base / f"n{index + 1}")
            node.prepare()
            self.nodes.append(node)
        for node in self.nodes:
            node.launch()
        # Each wait is a few CLI calls that boot an Erlang VM: the three run side by side.
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(Node.wait_started, self.nodes))
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            node.ctl("reset")
            node.ctl("join_cluster", first.name)
            node.ctl("start_app")
            node.ctl("await_startup")

    def restart(self, node: Node) -> None:
        """Start a stopped or killed node again; it rejoins with its data."""
        node.launch()
        node.wait_started()

    def connection_count(self) -> int:
        """Client connections on the whole cluster (listed by any running node)."""
        return self.running_nodes()[0].connection_count()

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()
        # A node whose process went away may leave its Erlang VM behind (not ours to find
        # by name), so each stop above kills the whole process group it started.
        shutil.rmtree(self.base, ignore_errors=True)

    def running_nodes(self) -> list[Node]:
        return [node for node in self.nodes if node.running]


def start_cluster() -> Cluster:
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="orders-rmq-cluster-")))
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster


async def restart_node(cluster: Cluster, node: Node) -> None:
    await asyncio.to_thread(cluster.restart, node)
