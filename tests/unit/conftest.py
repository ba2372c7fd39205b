"""The unit layer: pure code only, no PostgreSQL, Redis or RabbitMQ, no processes; seconds.

`pytest tests/unit` (`make test-unit`) starts nothing. The fixtures of `tests/conftest.py`
that reach a service are all lazy, and here a test that asks for one fails at collection,
and a test that opens a TCP connection fails: such a test belongs in `tests/`.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

UNIT_DIR = Path(__file__).resolve().parent

# The fixtures of tests/conftest.py (and tests/faults/conftest.py) that reach a service.
SERVICE_FIXTURES = frozenset(
    {
        "database",
        "engine",
        "sessionmaker",
        "redis",
        "rabbit_cleanup",
        "rabbit_cluster",
        "redis_cluster",
        "redis_sentinel",
        "redis_tls",
        "app_factory",
        "app",
        "client",
        "user",
        "other_user",
        "admin",
        "start_service",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    misplaced = [
        f"{item.nodeid} uses {', '.join(sorted(used))}"
        for item in items
        if UNIT_DIR in item.path.parents
        and (used := SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ())))
    ]
    if misplaced:
        raise pytest.UsageError(
            "unit tests must not use a service fixture:\n  " + "\n  ".join(misplaced)
        )


@pytest.fixture(scope="session")
def private_postgres() -> None:
    """Not the PgBouncer pass's private PostgreSQL (autouse above): nothing is started here."""


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """A TCP connection from a unit test fails: the machine's services are not its business."""
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def refuse(self: socket.socket, address: Any) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"a unit test connected to {address!r}; move it out of tests/unit")

    def connect(self: socket.socket, address: Any) -> None:
        refuse(self, address)
        real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        refuse(self, address)
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
