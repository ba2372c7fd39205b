"""Operator commands: `python -m api.cli create-database | promote-admin EMAIL | demo | clean`.

Every failure is one line on stderr naming what is wrong and what to do, with exit
status 1; a trace is for bugs, not for a database that is missing or not started.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

import aio_pika
import aiormq
import asyncpg
import orjson
from redis.exceptions import RedisError

from api.configs import AppEnv, Settings, load_settings
from api.database.connection import (
    NoPrimaryError,
    connect_raw,
    create_engine,
    create_sessionmaker,
)
from api.database.query import databases as database_queries
from api.database.query import users as user_queries
from api.helpers.enums import UserRole
from api.rabbit_core.topology import TopologyNames
from api.redis_core.client import create_redis

COMPOSE_HINT = "start it, or: docker compose up -d postgres redis rabbitmq"


class CommandFailed(Exception):
    """A failure the operator can act on; its text is the whole message."""


async def _connect_maintenance_db(settings: Settings) -> asyncpg.Connection:
    # On the primary of POSTGRES_HOSTS: a standby can neither create nor drop a database.
    return await connect_raw(settings, database="postgres")


async def create_database(settings: Settings) -> str:
    """Create POSTGRES_DB when it does not exist yet (connecting to `postgres` on the primary)."""
    conn = await _connect_maintenance_db(settings)
    try:
        if await database_queries.database_exists(conn, name=settings.POSTGRES_DB):
            return f"database {settings.POSTGRES_DB!r} exists"
        await database_queries.create_database(conn, name=settings.POSTGRES_DB)
        return f"database {settings.POSTGRES_DB!r} created"
    finally:
        await conn.close()


async def promote_admin(settings: Settings, email: str) -> bool:
    """Give the user with `email` the admin role; False when there is no such user."""
    engine = create_engine(settings)
    try:
        async with create_sessionmaker(engine)() as session, session.begin():
            return await user_queries.set_user_role(
                session, email=email.strip().lower(), role=UserRole.ADMIN
            )
    finally:
        await engine.dispose()


# --- demo: a user, an admin and a few orders, through the running API ----------------------

DEMO_PASSWORD = "demo password 2026"  # noqa: S105 (documented demo account)
DEMO_USER = "demo-user@example.com"
DEMO_ADMIN = "demo-admin@example.com"
DEMO_ORDERS = (
    {
        "currency": "EUR",
        "items": [{"sku": "MUG-350", "name": "Mug", "quantity": 2, "unit_price": 1250}],
    },
    {
        "currency": "EUR",
        "items": [{"sku": "TEA-100G", "name": "Tea", "quantity": 3, "unit_price": 699}],
    },
    {
        "currency": "USD",
        "items": [{"sku": "BAG-TOTE", "name": "Tote bag", "quantity": 1, "unit_price": 1500}],
    },
)


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any


def _call(api: str, method: str, path: str, body: Any = None, token: str | None = None) -> Answer:
    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = orjson.dumps(body)
        headers["Content-Type"] = "application/json"
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = Request(api + path, data=data, headers=headers, method=method)  # noqa: S310 (http only)
    try:
        with urlopen(request, timeout=10) as response:  # noqa: S310 (the scheme is checked)
            raw = response.read()
            return Answer(response.status, orjson.loads(raw) if raw else None)
    except HTTPError as exc:
        raw = exc.read()
        return Answer(exc.code, orjson.loads(raw) if raw else None)
    except (URLError, OSError) as exc:
        raise CommandFailed(
            f"the API is not answering on {api} ({_reason(exc)}); start it with: make run"
        ) from exc


def _reason(exc: BaseException) -> str:
    inner = getattr(exc, "reason", exc)
    return str(getattr(inner, "strerror", None) or inner).lower()


def _login(api: str, email: str) -> str:
    registered = _call(
        api,
        "POST",
        "/v1/auth/register",
        {"email": email, "password": DEMO_PASSWORD, "name": "Demo"},
    )
    if registered.status not in (201, 409):
        raise CommandFailed(f"registering {email} answered {registered.status}: {registered.body}")
    login = _call(api, "POST", "/v1/auth/login", {"email": email, "password": DEMO_PASSWORD})
    if login.status != 200:
        raise CommandFailed(
            f"logging in as {email} answered {login.status} (was it registered with another"
            " password? run: make clean)"
        )
    return str(login.body["access_token"])


async def demo(settings: Settings, api: str) -> list[str]:
    """Seed a user with a few orders and an admin through the API; lines to print."""
    if not api.startswith(("http://", "https://")):
        raise CommandFailed(f"--api must be an http(s) URL, not {api!r}")
    api = api.rstrip("/")
    user_token = await asyncio.to_thread(_login, api, DEMO_USER)
    admin_token = await asyncio.to_thread(_login, api, DEMO_ADMIN)
    await promote_admin(settings, DEMO_ADMIN)
    order_ids = []
    for order in DEMO_ORDERS:
        created = await asyncio.to_thread(_call, api, "POST", "/v1/orders", order, user_token)
        if created.status != 201:
            raise CommandFailed(f"placing a demo order answered {created.status}: {created.body}")
        order_ids.append(created.body["id"])
    return [
        f"user   {DEMO_USER} / {DEMO_PASSWORD!r}",
        f"admin  {DEMO_ADMIN} / {DEMO_PASSWORD!r}",
        f"orders {', '.join(order_ids)} (of the user)",
        "",
        "access tokens (valid for JWT_LIFETIME minutes):",
        f"export USER_TOKEN={user_token}",
        f"export ADMIN_TOKEN={admin_token}",
        "",
        f'curl -s {api}/v1/orders -H "Authorization: Bearer $USER_TOKEN"',
    ]


# --- clean: drop what this configuration created ---------------------------------------------


def clean_plan(settings: Settings) -> list[str]:
    names = TopologyNames.from_settings(settings)
    return [
        f"PostgreSQL database {settings.POSTGRES_DB!r} on "
        f"{settings.POSTGRES_HOST}:{settings.POSTGRES_PORT}",
        f"Redis keys {settings.REDIS_KEY_PREFIX}* in db {settings.REDIS_DB} on "
        f"{settings.REDIS_HOST}:{settings.REDIS_PORT}",
        f"RabbitMQ queues {', '.join(names.queues)}",
        f"RabbitMQ exchanges {', '.join(names.exchanges)}",
    ]


async def clean(settings: Settings) -> list[str]:
    """Drop the database, the Redis keys under the prefix and the RabbitMQ objects."""
    if settings.APP_ENV is AppEnv.PRODUCTION:
        raise CommandFailed("clean refuses to run with APP_ENV=production")
    if not settings.REDIS_KEY_PREFIX:
        raise CommandFailed("clean refuses an empty REDIS_KEY_PREFIX (it would empty the db)")
    done: list[str] = []

    conn = await _connect_maintenance_db(settings)
    try:
        await database_queries.drop_database(conn, name=settings.POSTGRES_DB)
    finally:
        await conn.close()
    done.append(f"dropped database {settings.POSTGRES_DB!r}")

    redis = create_redis(settings)
    deleted = 0
    try:
        batch: list[bytes] = []
        # SCAN, never KEYS: a shared Redis keeps serving while this walks it.
        async for key in redis.scan_iter(match=f"{settings.REDIS_KEY_PREFIX}*", count=1000):
            batch.append(key)
            if len(batch) == 1000:
                deleted += await redis.unlink(*batch)
                batch.clear()
        if batch:
            deleted += await redis.unlink(*batch)
    finally:
        await redis.aclose()
    done.append(f"deleted {deleted} Redis keys under {settings.REDIS_KEY_PREFIX!r}")

    names = TopologyNames.from_settings(settings)
    connection = await aio_pika.connect(settings.rabbitmq_url, timeout=5)
    async with connection:
        channel = await connection.channel()
        for queue in names.queues:
            await channel.queue_delete(queue)
        for exchange in names.exchanges:
            await channel.exchange_delete(exchange)
    done.append(f"deleted {len(names.queues)} queues and {len(names.exchanges)} exchanges")
    return done


# --- one line per failure ----------------------------------------------------------------------


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or getattr(current, "orig", None) or current.__context__


def explain(exc: BaseException, settings: Settings) -> str:
    """One line saying what failed and what to do about it."""
    postgres = f"PostgreSQL on {settings.POSTGRES_HOST}:{settings.POSTGRES_PORT}"
    for cause in _causes(exc):
        if isinstance(cause, CommandFailed):
            return str(cause)
        if isinstance(cause, NoPrimaryError):
            if len(settings.postgres_hosts) > 1:
                return f"{cause} ({COMPOSE_HINT})"  # each node's reason is in the message
            continue  # with one node, its cause (refused, no such database...) says it better
        if isinstance(cause, asyncpg.InvalidCatalogNameError):
            return (
                f"database {settings.POSTGRES_DB!r} does not exist on {settings.POSTGRES_HOST}:"
                f"{settings.POSTGRES_PORT} (create and migrate it: make migrate)"
            )
        if isinstance(cause, asyncpg.UndefinedTableError):
            return f"database {settings.POSTGRES_DB!r} is not migrated (run: make migrate)"
        if isinstance(cause, asyncpg.InvalidAuthorizationSpecificationError):
            return f"{postgres} refused POSTGRES_USER {settings.POSTGRES_USER!r}: {cause}"
        if isinstance(cause, asyncpg.PostgresError):
            return f"{postgres} answered: {cause}"
        if isinstance(cause, RedisError):
            return f"Redis on {settings.REDIS_HOST}:{settings.REDIS_PORT}: {cause} ({COMPOSE_HINT})"
        if isinstance(cause, aiormq.exceptions.AMQPError):
            return f"RabbitMQ on {settings.RMQ_HOST}:{settings.RMQ_PORT}: {cause} ({COMPOSE_HINT})"
        if isinstance(cause, ConnectionRefusedError):
            service = _service_of(cause, settings)
            return f"{service} is not answering (connection refused; {COMPOSE_HINT})"
        if isinstance(cause, OSError | TimeoutError):
            return f"{_service_of(cause, settings)} cannot be reached: {cause} ({COMPOSE_HINT})"
    return f"{type(exc).__name__}: {exc}"


def _service_of(exc: BaseException, settings: Settings) -> str:
    text = str(exc)
    for name, host, port in (
        ("Redis", settings.REDIS_HOST, settings.REDIS_PORT),
        ("RabbitMQ", settings.RMQ_HOST, settings.RMQ_PORT),
        ("PostgreSQL", settings.POSTGRES_HOST, settings.POSTGRES_PORT),
    ):
        if f"{port}" in text:
            return f"{name} on {host}:{port}"
    return f"PostgreSQL on {settings.POSTGRES_HOST}:{settings.POSTGRES_PORT}"


def _confirmed(plan: list[str]) -> bool:
    sys.stderr.write("This deletes:\n" + "".join(f"  {line}\n" for line in plan))
    if not sys.stdin.isatty():
        sys.stderr.write("clean: not confirmed (no terminal); pass --yes (make clean YES=1)\n")
        return False
    sys.stderr.write("Type 'yes' to go on: ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() == "yes"


def run(args: argparse.Namespace, settings: Settings) -> int:
    out = sys.stdout.write
    if args.command == "create-database":
        out(asyncio.run(create_database(settings)) + "\n")
        return 0
    if args.command == "promote-admin":
        if asyncio.run(promote_admin(settings, args.email)):
            out(f"{args.email.strip().lower()} is now an admin\n")
            return 0
        sys.stderr.write(f"promote-admin: no user with email {args.email!r}\n")
        return 1
    if args.command == "demo":
        api = args.api or f"http://{settings.HOST}:{settings.PORT}"
        out("".join(f"{line}\n" for line in asyncio.run(demo(settings, api))))
        return 0
    if not args.yes and not _confirmed(clean_plan(settings)):
        return 1
    out("".join(f"{line}\n" for line in asyncio.run(clean(settings))))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m api.cli", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("create-database", help="create POSTGRES_DB if it does not exist")
    promote = commands.add_parser("promote-admin", help="give an existing user the admin role")
    promote.add_argument("email")
    demo_parser = commands.add_parser(
        "demo", help="seed a user, an admin and a few orders through the running API"
    )
    demo_parser.add_argument("--api", help="the API's base URL (default: http://HOST:PORT)")
    clean_parser = commands.add_parser(
        "clean", help="drop the database, the Redis keys under the prefix and the RabbitMQ names"
    )
    clean_parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    args = parser.parse_args(argv)

    settings = load_settings()
    try:
        return run(args, settings)
    except Exception as exc:
        sys.stderr.write(f"{args.command}: {explain(exc, settings)}\n")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
