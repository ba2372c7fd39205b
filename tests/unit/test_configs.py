"""Configuration that fails fast: `host[:port]` lists, rate-limit policies, one-line refusals."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from api.configs import (
    EXAMPLE_JWT_SECRET,
    HostPort,
    RateLimitPolicy,
    Settings,
    describe_error,
    load_settings,
)

# --- HostPort ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "default", "parsed"),
    [
        ("db1:5432", None, HostPort("db1", 5432)),
        ("  db1:6000 ", None, HostPort("db1", 6000)),
        ("10.0.0.7:1", None, HostPort("10.0.0.7", 1)),
        ("[::1]:6379", None, HostPort("::1", 6379)),
        ("[2001:db8::5]:65535", None, HostPort("2001:db8::5", 65535)),
        ("db1", 5432, HostPort("db1", 5432)),
        ("db1:6000", 5432, HostPort("db1", 6000)),  # a port given wins over the default
        ("[::1]", 5672, HostPort("::1", 5672)),
        # A bare IPv6 address is one host, never host "::" and port "1".
        ("2001:db8::5", 5432, HostPort("2001:db8::5", 5432)),
    ],
)
def test_host_and_port_are_parsed(raw: str, default: int | None, parsed: HostPort) -> None:
    assert HostPort.parse(raw, default) == parsed


@pytest.mark.parametrize(
    ("raw", "default"),
    [
        ("db1", None),  # the port is required without a default
        ("[::1]", None),
        ("2001:db8::5", None),
        ("db1:0", None),
        ("db1:65536", None),
        ("db1:-1", None),
        ("db1:http", None),
        ("db1:", None),
        (":5432", None),
        ("", 5432),
        ("[::1]6379", None),
        ("[::1]:", 5432),
        ("[]:5432", None),
    ],
)
def test_a_bad_host_and_port_is_refused(raw: str, default: int | None) -> None:
    with pytest.raises(ValueError, match=r"port|host"):
        HostPort.parse(raw, default)


@pytest.mark.parametrize("raw", ["db1:5432", "[::1]:6379", "[2001:db8::5]:1"])
def test_a_host_and_port_prints_as_it_is_parsed(raw: str) -> None:
    assert str(HostPort.parse(raw)) == raw
    assert HostPort.parse(str(HostPort.parse(raw))) == HostPort.parse(raw)


def test_node_lists_take_the_services_port_when_an_entry_has_none() -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        POSTGRES_PORT=6432,
        POSTGRES_HOSTS="db1, db2:5433,[fd00::3]",
        RMQ_PORT=5673,
        RMQ_HOSTS="mq1,mq2:5700",
    )
    assert settings.postgres_hosts == [
        HostPort("db1", 6432),
        HostPort("db2", 5433),
        HostPort("fd00::3", 6432),
    ]
    assert settings.rabbitmq_nodes == [("mq1", 5673), ("mq2", 5700)]


# --- rate-limit policies ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "quota", "window"), [("100/60", 100, 60), (" 5 / 1 ", 5, 1), ("1/86400", 1, 86400)]
)
def test_a_policy_is_quota_slash_window(raw: str, quota: int, window: int) -> None:
    assert RateLimitPolicy.parse("auth", raw) == RateLimitPolicy("auth", quota, window)


@pytest.mark.parametrize("raw", ["0/60", "10/0", "ten per minute", "10/60/5", "10", "-1/60", ""])
def test_a_bad_policy_is_refused(raw: str) -> None:
    with pytest.raises(ValueError, match=r"quota|window"):
        RateLimitPolicy.parse("auth", raw)


def test_the_policies_are_named_after_their_variables() -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        RATE_LIMIT_DEFAULT="100/60",
        RATE_LIMIT_AUTH="10/60",
        RATE_LIMIT_ORDERS_CREATE="30/60",
    )
    assert settings.rate_limit_policies == {
        "default": RateLimitPolicy("default", 100, 60),
        "auth": RateLimitPolicy("auth", 10, 60),
        "orders_create": RateLimitPolicy("orders_create", 30, 60),
    }


# --- a bad value stops startup with one line naming it ------------------------------------


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No `.env` in the working directory and none of the machine's POSTGRES_/JWT_/APP_ values."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.upper().startswith(("POSTGRES_", "JWT_", "APP_")):
            monkeypatch.delenv(name)
    return monkeypatch


def _refusal(capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        load_settings()
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("POSTGRES_PORT", "not-a-port"),
        ("POSTGRES_HOSTS", "db1:5432,db2:not-a-port"),
        ("POSTGRES_POOLER", "pgpool-ii"),
        ("RATE_LIMIT_AUTH", "ten per minute"),
        ("WORKERS", "0"),
    ],
)
def test_bad_value_stops_startup_with_one_line_naming_it(
    clean_environment: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    value: str,
) -> None:
    clean_environment.setenv(variable, value)
    line = _refusal(capsys)
    assert variable in line
    assert value not in line


def test_production_refuses_the_example_jwt_secret(
    clean_environment: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_environment.setenv("APP_ENV", "production")
    clean_environment.setenv("JWT_SECRET_KEY", EXAMPLE_JWT_SECRET)
    line = _refusal(capsys)
    assert "JWT_SECRET_KEY" in line
    assert EXAMPLE_JWT_SECRET not in line


def test_production_refuses_a_short_jwt_secret(
    clean_environment: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_environment.setenv("APP_ENV", "production")
    clean_environment.setenv("JWT_SECRET_KEY", "short-secret")
    assert "JWT_SECRET_KEY" in _refusal(capsys)


def test_production_accepts_a_strong_secret(clean_environment: pytest.MonkeyPatch) -> None:
    clean_environment.setenv("APP_ENV", "production")
    clean_environment.setenv("JWT_SECRET_KEY", "s" * 48)
    assert load_settings().JWT_SECRET_KEY.get_secret_value() == "s" * 48


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"REDIS_MODE": "cluster"}, "REDIS_NODES: required when REDIS_MODE=cluster"),
        ({"REDIS_MODE": "sentinel"}, "REDIS_NODES: required when REDIS_MODE=sentinel"),
        (
            {"REDIS_MODE": "cluster", "REDIS_NODES": "127.0.0.1:17001", "REDIS_DB": "3"},
            "REDIS_DB: must be 0 when REDIS_MODE=cluster",
        ),
        ({"REDIS_MODE": "cluster", "REDIS_NODES": "no-port"}, "REDIS_NODES: expected 'host:port'"),
        ({"REDIS_MODE": "ring"}, "REDIS_MODE"),
        ({"REDIS_TLS": "true", "REDIS_TLS_CA_FILE": "/nonexistent/ca.crt"}, "REDIS_TLS_CA_FILE"),
        ({"REDIS_KEY_PREFIX": "orders{x}:"}, "REDIS_KEY_PREFIX: must not contain"),
    ],
)
def test_a_bad_redis_topology_is_one_line_naming_the_variable(
    values: dict[str, str], message: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None, **values)  # type: ignore[call-arg]
    line = describe_error(caught.value)
    assert message in line
    assert "\n" not in line
