"""A newcomer's first hour, against a real `python -m api` on a loopback port.

The server runs as `make run` starts it (the banner on), on a database and RabbitMQ
names of its own; the README's session (`examples/quickstart.sh`), the event consumer
and the status publisher examples and `make demo` run against it top to bottom.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from api.configs import Settings
from tests.event_helpers import scratch_events_environment, settings_env
from tests.faults.service import kill_group, stop_service

REPO_ROOT = Path(__file__).resolve().parents[1]
# The loopback ports this module may listen on.
PORTS = range(18501, 18600)
START_TIMEOUT = 90.0  # a loaded 2-core machine imports and connects slowly


def free_port() -> int:
    for port in random.sample(PORTS, len(PORTS)):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {PORTS.start}-{PORTS.stop - 1}")


@dataclass
class LiveServer:
    settings: Settings
    env: dict[str, str]
    port: int
    process: asyncio.subprocess.Process
    stdout: Path
    stderr: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=30.0, trust_env=False)

    def run(
        self, *command: str, timeout: float = 120, **env: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command,
            cwd=REPO_ROOT,
            env={**self.env, **env},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


async def _wait_ready(server: LiveServer) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    async with server.client() as client:
        while True:
            if server.process.returncode is not None:
                raise RuntimeError(f"the server exited:\n{server.stderr.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                ready = await client.get("/ping/ready")
                if ready.status_code == 200 and ready.json()["status"] == "pass":
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"not ready in {START_TIMEOUT}s:\n{server.stdout.read_text()}")
            await asyncio.sleep(0.2)


@pytest.fixture(scope="module")
async def live(
    settings: Settings, redis: Redis, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[LiveServer]:
    """`python -m api` as `make run` starts it, on its own database and RabbitMQ names."""
    workdir = tmp_path_factory.mktemp("live")
    async with scratch_events_environment(settings) as scratch:
        port = free_port()
        env = settings_env(
            scratch,
            APP_ENV="development",
            HOST="127.0.0.1",
            PORT=str(port),
            WORKERS="1",
            LOGLEVEL="INFO",
            ORDERS_API_BANNER="1",
            REDIS_HOST=scratch.REDIS_HOST,
            REDIS_PORT=str(scratch.REDIS_PORT),
            REDIS_DB=str(scratch.REDIS_DB),
            REDIS_KEY_PREFIX=f"{settings.REDIS_KEY_PREFIX}live:",  # removed with the run's keys
            RATE_LIMIT_DEFAULT="1000/60",
            RATE_LIMIT_AUTH="1000/60",
            RATE_LIMIT_ORDERS_CREATE="1000/60",
            AMQP_URL=scratch.rabbitmq_url,  # for the examples
            PYTHON=sys.executable,  # for quickstart.sh's CLI step
        )
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        stdout, stderr = workdir / "stdout.log", workdir / "stderr.log"
        with stdout.open("wb") as out, stderr.open("wb") as err:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "api",
                cwd=REPO_ROOT,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        server = LiveServer(scratch, env, port, process, stdout, stderr)
        try:
            await _wait_ready(server)
            yield server
        finally:
            await stop_service(process)
            kill_group(process)


async def _signed_in(server: LiveServer) -> dict[str, str]:
    email = f"first-hour-{uuid.uuid4().hex[:8]}@example.com"
    credentials = {"email": email, "password": "correct horse battery staple"}
    async with server.client() as client:
        assert (await client.post("/v1/auth/register", json=credentials)).status_code == 201
        login = await client.post("/v1/auth/login", json=credentials)
    return {"Authorization": f"Bearer {login.json()['access_token']}"}


async def _place_order(server: LiveServer, headers: dict[str, str]) -> str:
    async with server.client() as client:
        created = await client.post(
            "/v1/orders",
            json={"currency": "EUR", "items": [{"sku": "MUG-1", "quantity": 1, "unit_price": 990}]},
            headers=headers,
        )
    assert created.status_code == 201, created.text
    order_id: str = created.json()["id"]
    return order_id


async def test_make_run_prints_every_url_once_ready_and_each_answers(live: LiveServer) -> None:
    # The banner's thread polls /ping every 0.2 s: readiness may pass just before it writes.
    deadline = time.monotonic() + 10
    while "orders-api is ready" not in (banner := live.stderr.read_text()):
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert banner.count("orders-api is ready") == 1, banner
    urls = re.findall(r"http://127\.0\.0\.1:\d+\S*", banner)
    expected = ["/v1", "/docs", "/redoc", "/openapi.json", "/asyncapi.json", "/metrics"]
    assert [url.removeprefix(live.url) for url in urls] == expected
    async with live.client() as client:
        for path in expected[1:]:
            assert (await client.get(path)).status_code == 200, path


async def test_a_healthy_start_is_quiet_and_its_log_is_plain_json(live: LiveServer) -> None:
    lines = [json.loads(line) for line in live.stdout.read_text().splitlines()]
    assert any(line["message"].startswith("Uvicorn running on") for line in lines)
    for line in lines:
        assert "color_message" not in line
        assert "\x1b" not in json.dumps(line, ensure_ascii=False)
    loud = [line for line in lines if line["level"] in ("WARNING", "ERROR", "CRITICAL")]
    assert loud == []


async def test_a_taken_port_is_one_clear_line_and_exit_code_1(live: LiveServer) -> None:
    result = await asyncio.to_thread(live.run, sys.executable, "-m", "api")
    assert result.returncode == 1
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert f"127.0.0.1:{live.port}" in line
    assert "address already in use" in line
    assert "Reconnecting" not in result.stderr


async def test_the_readme_quickstart_runs_top_to_bottom(live: LiveServer) -> None:
    result = await asyncio.to_thread(
        live.run, "bash", "examples/quickstart.sh", API=live.url, timeout=180
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for expected in (
        "Idempotent-Replayed: true",
        "HTTP 304 Not Modified",
        "urn:orders-api:problem:invalid-transition",
        "is now an admin",
        '"status":"paid","version":2',
        "urn:orders-api:problem:precondition-failed",
        'RateLimit-Policy: "default";q=1000;w=60',
        'RateLimit: "default";r=',
        "Done: every step answered as documented.",
    ):
        assert expected in out, (expected, out)


async def test_the_consumer_example_prints_an_orders_events_in_sequence(
    live: LiveServer,
) -> None:
    headers = await _signed_in(live)
    order_id = await _place_order(live, headers)
    async with live.client() as client:
        assert (await client.post(f"/v1/orders/{order_id}/cancel", headers=headers)).is_success
    result = await asyncio.to_thread(
        live.run, sys.executable, "examples/consumer.py", "--idle", "5"
    )
    assert result.returncode == 0, result.stderr
    mine = [line.split() for line in result.stdout.splitlines() if order_id in line]
    assert [(words[0], words[3], words[5]) for words in mine] == [
        ("order.created", "00000000000000000001", "pending"),
        ("order.cancelled", "00000000000000000002", "cancelled"),
    ]


async def _noop_status_messages(client: httpx.AsyncClient) -> float:
    metrics = (await client.get("/metrics")).text
    found = re.search(r'^status_messages_total\{outcome="noop"\} (\S+)$', metrics, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def test_the_status_publisher_example_marks_an_order_paid_once(live: LiveServer) -> None:
    headers = await _signed_in(live)
    order_id = await _place_order(live, headers)
    publish = ("examples/status_publisher.py", order_id)
    first = await asyncio.to_thread(live.run, sys.executable, *publish)
    assert first.returncode == 0, first.stderr
    assert f"message_id payment-{order_id}-paid" in first.stdout
    async with live.client() as client:
        deadline = time.monotonic() + 30
        while (order := (await client.get(f"/v1/orders/{order_id}", headers=headers)).json())[
            "status"
        ] != "paid":
            assert time.monotonic() < deadline, order
            await asyncio.sleep(0.2)
        assert order["version"] == 2
        noops = await _noop_status_messages(client)

        # A retry carries the same message_id: applied once, acked as a no-op.
        again = await asyncio.to_thread(live.run, sys.executable, *publish)
        assert again.returncode == 0, again.stderr
        while await _noop_status_messages(client) < noops + 1:
            assert time.monotonic() < deadline + 30
            await asyncio.sleep(0.2)
        after = (await client.get(f"/v1/orders/{order_id}", headers=headers)).json()
        assert (after["status"], after["version"]) == ("paid", 2)


async def test_make_demo_seeds_a_user_an_admin_and_orders_and_prints_their_tokens(
    live: LiveServer,
) -> None:
    for _ in range(2):  # a second run reuses the accounts
        result = await asyncio.to_thread(
            live.run, sys.executable, "-m", "api.cli", "demo", "--api", live.url
        )
        assert result.returncode == 0, result.stderr
    tokens = dict(re.findall(r"^export (\w+)=(\S+)$", result.stdout, re.MULTILINE))
    async with live.client() as client:
        admin = {"Authorization": f"Bearer {tokens['ADMIN_TOKEN']}"}
        user = {"Authorization": f"Bearer {tokens['USER_TOKEN']}"}
        assert (await client.get("/v1/auth/me", headers=admin)).json()["role"] == "admin"
        me = (await client.get("/v1/auth/me", headers=user)).json()
        assert me["role"] == "user"
        orders = (await client.get("/v1/orders", headers=user)).json()["items"]
        assert len(orders) == 6  # three per run
        seen_by_admin = await client.get(f"/v1/orders?user_id={me['id']}", headers=admin)
        assert len(seen_by_admin.json()["items"]) == 6


async def test_make_demo_without_a_server_says_so_in_one_line(live: LiveServer) -> None:
    result = await asyncio.to_thread(
        live.run,
        sys.executable,
        "-m",
        "api.cli",
        "demo",
        "--api",
        f"http://127.0.0.1:{free_port()}",
    )
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert "the API is not answering" in line
    assert "make run" in line


def test_the_examples_read_the_same_variables_as_the_service() -> None:
    # The README tells a processor to point them at RMQ_QUEUE / RMQ_STATUS_QUEUE.
    consumer = (REPO_ROOT / "examples/consumer.py").read_text()
    publisher = (REPO_ROOT / "examples/status_publisher.py").read_text()
    assert 'os.environ.get("RMQ_QUEUE", "orders.events")' in consumer
    assert 'os.environ.get("RMQ_STATUS_QUEUE", "orders.status-updates")' in publisher
    assert "message_id=message_id" in publisher
    assert os.access(REPO_ROOT / "examples/quickstart.sh", os.X_OK)


README = REPO_ROOT / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), re.MULTILINE | re.DOTALL)


def test_the_readme_python_examples_define_every_name_they_use(tmp_path: Path) -> None:
    blocks = _blocks("python")
    assert len(blocks) >= 2
    for index, block in enumerate(blocks):
        (tmp_path / f"block_{index}.py").write_text(block)
    # Pyflakes' rules: an undefined name (the old status-publisher example) is F821.
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--isolated", "--select", "F", "."],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout


def test_the_readme_shell_blocks_parse_and_it_has_one_title() -> None:
    for block in _blocks("(?:sh|bash)"):
        result = subprocess.run(
            ["bash", "-n"], input=block, capture_output=True, text=True, timeout=30, check=False
        )
        assert result.returncode == 0, (result.stderr, block)
    prose = re.sub(r"^```.*?^```", "", README.read_text(), flags=re.MULTILINE | re.DOTALL)
    titles = [line for line in prose.splitlines() if line.startswith("# ")]
    assert titles == ["# orders-api"]  # chapters are `##`; no stray `# Issue …` heading


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (["run"], "ORDERS_API_BANNER=1 uv run --frozen python -m api"),
        (["demo"], "uv run --frozen python -m api.cli demo"),
        (["clean"], "uv run --frozen python -m api.cli clean \n"),
        (["clean", "YES=1"], "uv run --frozen python -m api.cli clean --yes\n"),
        (["cli", "ARGS=promote-admin ada@example.com"], "api.cli promote-admin ada@example.com\n"),
    ],
)
def test_the_make_targets_of_the_first_hour_run_the_documented_commands(
    target: list[str], expected: str
) -> None:
    result = subprocess.run(
        ["make", "--dry-run", *target],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout + "\n", result.stdout
