"""Typed configuration from the environment (and an optional `.env` file)."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Annotated, Literal
from urllib.parse import quote

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import URL

# The secret shipped in `.env.local`; production refuses it.
EXAMPLE_JWT_SECRET = "change-me-in-production-this-is-only-for-local-dev"  # noqa: S105
MIN_PRODUCTION_SECRET_BYTES = 32

_RATE_LIMIT_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


class RedisMode(StrEnum):
    STANDALONE = "standalone"
    SENTINEL = "sentinel"
    CLUSTER = "cluster"


class AppEnv(StrEnum):
    DEVELOPMENT = "development"
    PRODUCTION = "production"


class PostgresPooler(StrEnum):
    """What sits between the service and PostgreSQL."""

    NONE = "none"
    # PgBouncer in transaction pooling mode: no session state survives a transaction.
    PGBOUNCER = "pgbouncer"


_NOT_HOST_PORT = "every entry must be host[:port], the port 1-65535"


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, raw: str, default_port: int | None = None) -> HostPort:
        """`host:port` or `[v6]:port`; also `host` or `[v6]` when there is a default port."""
        raw = raw.strip()
        host, port = raw, "" if default_port is None else str(default_port)
        if raw.startswith("["):
            host, _, rest = raw[1:].partition("]")
            if rest:
                if not rest.startswith(":"):
                    raise ValueError(_NOT_HOST_PORT)
                port = rest[1:]
        elif raw.count(":") == 1:
            host, port = raw.split(":")
        if not port and default_port is None:
            raise ValueError("expected 'host:port' (the port is required)")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(_NOT_HOST_PORT)
        return cls(host, int(port))


@dataclass(frozen=True, slots=True)
class RateLimitPolicy:
    """A token bucket: `quota` tokens refilled evenly over `window` seconds."""

    name: str
    quota: int
    window: int

    @classmethod
    def parse(cls, name: str, raw: str) -> RateLimitPolicy:
        match = _RATE_LIMIT_RE.match(raw)
        if match is None:
            raise ValueError("expected '<quota>/<window seconds>', e.g. '100/60'")
        quota, window = int(match[1]), int(match[2])
        if quota < 1 or window < 1:
            raise ValueError("quota and window must be at least 1")
        return cls(name=name, quota=quota, window=window)


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


CsvList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Every knob of the service; names are those of `.env.local`."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
    )

    APP_ENV: AppEnv = AppEnv.DEVELOPMENT
    HOST: str = "127.0.0.1"
    PORT: int = Field(default=8000, ge=1, le=65535)
    WORKERS: int = Field(default=1, ge=1, le=64)
    # Where `python -m api.worker` serves /livez, /readyz and /metrics.
    WORKER_PORT: int = Field(default=8001, ge=1, le=65535)
    LOGLEVEL: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    POSTGRES_HOST: str = "127.0.0.1"
    POSTGRES_PORT: int = Field(default=5432, ge=1, le=65535)
    # `host[:port]` of every node, tried in order for one that accepts writes (libpq's
    # target_session_attrs=read-write); overrides POSTGRES_HOST/POSTGRES_PORT.
    POSTGRES_HOSTS: CsvList = Field(default_factory=list)
    POSTGRES_POOLER: PostgresPooler = PostgresPooler.NONE
    # `host[:port]` list for the relay's LISTEN connection, which must bypass a
    # transaction pooler. Empty: the primary found through the hosts above.
    POSTGRES_LISTEN_HOST: CsvList = Field(default_factory=list)
    POSTGRES_DB: str = Field(default="orders", min_length=1, max_length=63)
    POSTGRES_USER: str = "postgres"
    POSTGRES_PASSWORD: SecretStr = SecretStr("")
    # Seconds a statement (and an idle transaction) may run before PostgreSQL cancels it.
    POSTGRES_TRANSACTION_TIMEOUT: float = Field(default=5.0, gt=0, le=600)
    POSTGRES_ECHO: bool = False
    # Per worker process; mind PostgreSQL's max_connections (100 by default) across
    # workers, replicas and relays. No overflow by default: an overflow connection is
    # closed when it is returned, so load above the pool size would open and close a
    # connection per request (measured: 2.8x less throughput at 32 concurrent requests
    # per worker). A request holds a connection for one statement on the hot paths, so
    # ten serve far more requests at once by queueing for a few microseconds.
    POSTGRES_POOL_SIZE: int = Field(default=10, ge=1, le=200)
    POSTGRES_MAX_OVERFLOW: int = Field(default=0, ge=0, le=200)
    # A pre-ping costs BEGIN + SELECT + ROLLBACK on every checkout with asyncpg. Without
    # it, the first statement on a connection that died with a PostgreSQL restart fails
    # (a 503) and invalidates every older pooled connection, so the pool heals at once.
    POSTGRES_POOL_PRE_PING: bool = False
    POSTGRES_POOL_TIMEOUT: float = Field(default=5.0, gt=0, le=120)
    POSTGRES_CONNECT_TIMEOUT: float = Field(default=3.0, gt=0, le=60)

    RMQ_USER: str = "guest"
    RMQ_PASSWORD: SecretStr = SecretStr("guest")
    RMQ_HOST: str = "127.0.0.1"
    RMQ_PORT: int = Field(default=5672, ge=1, le=65535)
    RMQ_VHOST: str = "/"
    # Extra AMQP URL query parameters, e.g. `heartbeat=30&connection_timeout=5`.
    RMQ_PARAMS: str = ""
    RMQ_EXCHANGE: str = Field(default="orders", min_length=1, max_length=255)
    RMQ_QUEUE: str = Field(default="orders.events", min_length=1, max_length=255)
    RMQ_STATUS_QUEUE: str = Field(default="orders.status-updates", min_length=1, max_length=255)
    RMQ_RPC_EXCHANGE: str = Field(default="orders.rpc", min_length=1, max_length=255)
    # The cluster's nodes, `host[:port]` comma-separated; overrides RMQ_HOST/RMQ_PORT.
    RMQ_HOSTS: CsvList = Field(default_factory=list)
    # The events, status and dead-letter queues' type; a quorum queue survives its node.
    RMQ_QUEUE_TYPE: Literal["quorum", "classic"] = "quorum"
    # Deliveries of one message before a quorum queue dead-letters it (a poison message).
    RMQ_DELIVERY_LIMIT: int = Field(default=5, ge=1, le=1000)

    REDIS_HOST: str = "127.0.0.1"
    REDIS_PORT: int = Field(default=6379, ge=1, le=65535)
    REDIS_DB: int = Field(default=0, ge=0, le=15)
    REDIS_PASSWORD: SecretStr = SecretStr("")
    # ACL user; when set it authenticates with REDIS_USER_PASSWORD instead of REDIS_PASSWORD.
    REDIS_USER: str = ""
    REDIS_USER_PASSWORD: SecretStr = SecretStr("")
    REDIS_TTL_EXPIRE: int = Field(default=60, ge=1, le=86_400)
    REDIS_KEY_PREFIX: str = Field(default="orders:", max_length=64)
    REDIS_SOCKET_TIMEOUT: float = Field(default=0.5, gt=0, le=30)
    # SPEC §12: the topology, its nodes (sentinels, or cluster seed nodes) and TLS.
    REDIS_MODE: RedisMode = RedisMode.STANDALONE
    REDIS_NODES: CsvList = Field(default_factory=list)
    REDIS_SENTINEL_MASTER: str = Field(default="mymaster", min_length=1, max_length=255)
    REDIS_TLS: bool = False
    REDIS_TLS_CA_FILE: str = ""
    REDIS_TLS_CERT_FILE: str = ""
    REDIS_TLS_KEY_FILE: str = ""
    # While Redis is away each process limits with its own buckets; this divides every
    # quota in them, so a fleet of N processes admits about Q*N/N = Q per window when set
    # to the number of processes (README, "Fleet-wide quota"). 1 keeps the full quota.
    RATE_LIMIT_FALLBACK_DIVISOR: int = Field(default=1, ge=1, le=10_000)

    JWT_SECRET_KEY: SecretStr = SecretStr(EXAMPLE_JWT_SECRET)
    JWT_ALGORITHM: Literal["HS256", "HS384", "HS512"] = "HS256"
    JWT_LIFETIME: int = Field(default=15, ge=1, le=24 * 60)
    JWT_REFRESH_LIFETIME_DAYS: int = Field(default=30, ge=1, le=365)

    ARGON2_TIME_COST: int = Field(default=2, ge=1, le=10)
    ARGON2_MEMORY_COST: int = Field(default=19_456, ge=8_192, le=1_048_576)
    ARGON2_PARALLELISM: int = Field(default=1, ge=1, le=16)

    ENV_ALLOWED_ORIGINS: CsvList = Field(default_factory=list)
    TRUSTED_PROXIES: CsvList = Field(default_factory=list)

    RATE_LIMIT_DEFAULT: str = "100/60"
    RATE_LIMIT_AUTH: str = "10/60"
    RATE_LIMIT_ORDERS_CREATE: str = "30/60"
    RATE_LIMIT_ENABLED: bool = True

    REDIRECT_SERVICES: CsvList = Field(default_factory=list)
    REDIRECT_TIMEOUT: float = Field(default=5.0, gt=0, le=300)

    OUTBOX_RELAY_ENABLED: bool = True
    OUTBOX_BATCH_SIZE: int = Field(default=500, ge=1, le=10_000)
    OUTBOX_POLL_INTERVAL: float = Field(default=1.0, gt=0, le=60)
    OUTBOX_RETENTION_HOURS: int = Field(default=24, ge=0, le=24 * 90)
    STATUS_CONSUMER_ENABLED: bool = True
    STATUS_PREFETCH: int = Field(default=32, ge=1, le=1000)

    IDEMPOTENCY_TTL_HOURS: int = Field(default=24, ge=1, le=24 * 30)

    @field_validator(
        "ENV_ALLOWED_ORIGINS",
        "TRUSTED_PROXIES",
        "REDIRECT_SERVICES",
        "REDIS_NODES",
        "RMQ_HOSTS",
        "POSTGRES_HOSTS",
        "POSTGRES_LISTEN_HOST",
        mode="before",
    )
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("TRUSTED_PROXIES")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            ip_network(entry, strict=False)
        return value

    @field_validator("RMQ_HOSTS", "POSTGRES_HOSTS", "POSTGRES_LISTEN_HOST")
    @classmethod
    def _host_list(cls, value: list[str]) -> list[str]:
        # The port may be left out (RMQ_PORT / POSTGRES_PORT then); any default checks the rest.
        for entry in value:
            HostPort.parse(entry, 5432)
        return value

    @field_validator("RATE_LIMIT_DEFAULT", "RATE_LIMIT_AUTH", "RATE_LIMIT_ORDERS_CREATE")
    @classmethod
    def _rate_limit(cls, value: str) -> str:
        RateLimitPolicy.parse("check", value)
        return value

    @field_validator("REDIS_KEY_PREFIX")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if any(ch.isspace() for ch in value):
            raise ValueError("must not contain white space")
        if "{" in value or "}" in value:
            # A brace would become every key's hash tag: one cluster slot for everything.
            raise ValueError("must not contain '{' or '}'")
        return value

    @field_validator("REDIS_NODES")
    @classmethod
    def _nodes(cls, value: list[str]) -> list[str]:
        for node in value:
            HostPort.parse(node)
        return value

    @model_validator(mode="after")
    def _redis_topology(self) -> Settings:
        if self.REDIS_MODE is not RedisMode.STANDALONE and not self.REDIS_NODES:
            raise ValueError(f"REDIS_NODES: required when REDIS_MODE={self.REDIS_MODE.value}")
        if self.REDIS_MODE is RedisMode.CLUSTER and self.REDIS_DB != 0:
            raise ValueError("REDIS_DB: must be 0 when REDIS_MODE=cluster")
        if not self.REDIS_TLS:
            return self
        for name in ("REDIS_TLS_CA_FILE", "REDIS_TLS_CERT_FILE", "REDIS_TLS_KEY_FILE"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ValueError(f"{name}: no such file")
        if bool(self.REDIS_TLS_CERT_FILE) != bool(self.REDIS_TLS_KEY_FILE):
            raise ValueError("REDIS_TLS_CERT_FILE: set together with REDIS_TLS_KEY_FILE")
        return self

    @model_validator(mode="after")
    def _production_secret(self) -> Settings:
        if self.APP_ENV is AppEnv.PRODUCTION:
            secret = self.JWT_SECRET_KEY.get_secret_value()
            if secret == EXAMPLE_JWT_SECRET:
                raise ValueError("JWT_SECRET_KEY: the example secret is refused in production")
            if len(secret.encode()) < MIN_PRODUCTION_SECRET_BYTES:
                raise ValueError(
                    f"JWT_SECRET_KEY: at least {MIN_PRODUCTION_SECRET_BYTES} bytes in production"
                )
            if "*" in self.ENV_ALLOWED_ORIGINS:
                raise ValueError("ENV_ALLOWED_ORIGINS: '*' is refused in production")
        return self

    @property
    def rate_limit_policies(self) -> dict[str, RateLimitPolicy]:
        return {
            name: RateLimitPolicy.parse(name, raw)
            for name, raw in (
                ("default", self.RATE_LIMIT_DEFAULT),
                ("auth", self.RATE_LIMIT_AUTH),
                ("orders_create", self.RATE_LIMIT_ORDERS_CREATE),
            )
        }

    @property
    def redis_nodes(self) -> list[tuple[str, int]]:
        return [(node.host, node.port) for node in map(HostPort.parse, self.REDIS_NODES)]

    @property
    def trusted_proxy_networks(self) -> list[IPv4Network | IPv6Network]:
        return [ip_network(entry, strict=False) for entry in self.TRUSTED_PROXIES]

    @property
    def postgres_hosts(self) -> list[HostPort]:
        """The nodes to try in order: POSTGRES_HOSTS, else POSTGRES_HOST:POSTGRES_PORT."""
        if self.POSTGRES_HOSTS:
            return [HostPort.parse(entry, self.POSTGRES_PORT) for entry in self.POSTGRES_HOSTS]
        return [HostPort(self.POSTGRES_HOST, self.POSTGRES_PORT)]

    @property
    def postgres_listen_hosts(self) -> list[HostPort]:
        """POSTGRES_LISTEN_HOST's nodes; empty when the relay should find the primary."""
        return [HostPort.parse(entry, self.POSTGRES_PORT) for entry in self.POSTGRES_LISTEN_HOST]

    @property
    def behind_pgbouncer(self) -> bool:
        return self.POSTGRES_POOLER is PostgresPooler.PGBOUNCER

    def postgres_url(self, database: str | None = None) -> URL:
        """The SQLAlchemy URL of the first node (the engine connects through `connect_primary`)."""
        first = self.postgres_hosts[0]
        return URL.create(
            "postgresql+asyncpg",
            username=self.POSTGRES_USER,
            password=self.POSTGRES_PASSWORD.get_secret_value() or None,
            host=first.host,
            port=first.port,
            database=database or self.POSTGRES_DB,
        )

    @property
    def rabbitmq_nodes(self) -> list[tuple[str, int]]:
        """`(host, port)` of every node to try: `RMQ_HOSTS`, else `RMQ_HOST:RMQ_PORT`."""
        if self.RMQ_HOSTS:
            return [
                (node.host, node.port)
                for node in (HostPort.parse(entry, self.RMQ_PORT) for entry in self.RMQ_HOSTS)
            ]
        return [(self.RMQ_HOST, self.RMQ_PORT)]

    def rabbitmq_node_url(self, host: str, port: int) -> str:
        """The AMQP URL of one node, with the credentials, vhost and `RMQ_PARAMS`."""
        user = quote(self.RMQ_USER, safe="")
        password = quote(self.RMQ_PASSWORD.get_secret_value(), safe="")
        vhost = quote(self.RMQ_VHOST, safe="")
        netloc = f"[{host}]" if ":" in host else host
        url = f"amqp://{user}:{password}@{netloc}:{port}/{vhost}"
        return f"{url}?{self.RMQ_PARAMS.lstrip('?')}" if self.RMQ_PARAMS else url

    @property
    def rabbitmq_url(self) -> str:
        """The URL of the first node (tools and tests that need one connection)."""
        return self.rabbitmq_node_url(*self.rabbitmq_nodes[0])


def describe_error(exc: ValidationError) -> str:
    """One line naming the first bad variable, without echoing its value."""
    err = exc.errors()[0]
    loc = ".".join(str(part) for part in err["loc"]) or "settings"
    message = err["msg"].removeprefix("Value error, ")
    return f"invalid configuration: {loc}: {message}"


def load_settings() -> Settings:
    """Settings from the environment; a bad value exits with one line naming it."""
    try:
        return Settings()
    except ValidationError as exc:
        sys.stderr.write(describe_error(exc) + "\n")
        raise SystemExit(2) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
