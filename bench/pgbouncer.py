"""A private PgBouncer (transaction pooling) in front of the bench's PostgreSQL.

The `order_create_pgbouncer` scenario runs a copy of the service through it with
POSTGRES_POOLER=pgbouncer, so `POST /v1/orders` is measured through the pooler
beside the direct figure of the same run.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from api.configs import Settings
from bench import servers
from bench.environment import SetupError
from bench.servers import Server

# Server connections per (database, user): the service's two pools of ten at most, so the
# figure shows the extra hop and the statement cache being off, not a queue in PgBouncer.
POOL_SIZE = 20
READY_TIMEOUT = 15.0


@dataclass
class PgBouncerServer(Server):
    """The PgBouncer process; its configuration directory goes with it."""

    home: Path | None = None

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            if self.home is not None:
                shutil.rmtree(self.home, ignore_errors=True)


def _unprivileged_user() -> list[str]:
    """PgBouncer refuses to run as root; `-u` makes it switch user itself."""
    if os.geteuid() != 0:
        return []
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return ["-u", name]
    raise SetupError("running as root and neither a postgres nor a nobody user exists")


def start_pgbouncer(settings: Settings, log_dir: Path) -> Server:
    """PgBouncer on a free loopback port, forwarding every database to POSTGRES_HOST."""
    binary = shutil.which("pgbouncer")
    if binary is None:
        raise SetupError("pgbouncer is missing: apt-get install -y pgbouncer")
    port = servers.free_port()
    home = Path(tempfile.mkdtemp(prefix="orders-bench-pgbouncer-"))
    node = settings.postgres_hosts[0]
    password = settings.POSTGRES_PASSWORD.get_secret_value().replace('"', '""')
    (home / "users.txt").write_text(f'"{settings.POSTGRES_USER}" "{password}"\n')
    (home / "pgbouncer.ini").write_text(
        "\n".join(
            [
                "[databases]",
                f"* = host={node.host} port={node.port}",
                "[pgbouncer]",
                "listen_addr = 127.0.0.1",
                f"listen_port = {port}",
                f"unix_socket_dir = {home}",
                "auth_type = trust",
                f"auth_file = {home / 'users.txt'}",
                "pool_mode = transaction",
                f"default_pool_size = {POOL_SIZE}",
                "max_client_conn = 1000",
                "",
            ]
        )
    )
    user = _unprivileged_user()
    if user:
        for path in (home, *home.iterdir()):
            shutil.chown(path, user[1])
    started = servers.start(
        "pgbouncer", [binary, *user, str(home / "pgbouncer.ini")], dict(os.environ), log_dir, port
    )
    server = PgBouncerServer(started.name, port, started.process, started.log_path, home)
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            server.stop()
            raise SetupError(f"pgbouncer exited:\n{server.log_tail()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            time.sleep(0.1)
            continue
        return server
    server.stop()
    raise SetupError(f"pgbouncer did not listen on {port}:\n{server.log_tail()}")
