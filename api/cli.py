"""Operator commands: `python -m api.cli create-database | promote-admin EMAIL`."""

from __future__ import annotations

import argparse
import asyncio
import sys

from sqlalchemy import update

from api.configs import Settings, load_settings
from api.database.connection import NoPrimaryError, connect_primary, create_engine
from api.helpers.enums import UserRole
from api.models import User


async def create_database(settings: Settings) -> str:
    """Create POSTGRES_DB when it does not exist yet (connecting to `postgres` on the primary)."""
    # On the primary of POSTGRES_HOSTS: a standby cannot create it, and replicates it.
    conn = await connect_primary(settings, database="postgres")
    try:
        exists = await conn.fetchval(
            "SELECT 1 FROM pg_database WHERE datname = $1", settings.POSTGRES_DB
        )
        if exists:
            return f"database {settings.POSTGRES_DB!r} exists"
        # Identifiers cannot be bound as parameters; quote it the PostgreSQL way.
        quoted = '"' + settings.POSTGRES_DB.replace('"', '""') + '"'
        await conn.execute(f"CREATE DATABASE {quoted}")
        return f"database {settings.POSTGRES_DB!r} created"
    finally:
        await conn.close()


async def promote_admin(settings: Settings, email: str) -> bool:
    """Give the user with `email` the admin role; False when there is no such user."""
    engine = create_engine(settings)
    try:
        async with engine.begin() as conn:
            result = await conn.execute(
                update(User)
                .where(User.email == email.strip().lower())
                .values(role=UserRole.ADMIN.value)
                .returning(User.id)
            )
            return result.first() is not None
    finally:
        await engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m api.cli", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("create-database", help="create POSTGRES_DB if it does not exist")
    promote = commands.add_parser("promote-admin", help="give an existing user the admin role")
    promote.add_argument("email")
    args = parser.parse_args(argv)

    settings = load_settings()
    if args.command == "create-database":
        try:
            sys.stdout.write(asyncio.run(create_database(settings)) + "\n")
        except NoPrimaryError as exc:
            sys.stderr.write(f"create-database: {exc}\n")
            return 1
        return 0
    if asyncio.run(promote_admin(settings, args.email)):
        sys.stdout.write(f"{args.email.strip().lower()} is now an admin\n")
        return 0
    sys.stderr.write(f"promote-admin: no user with email {args.email!r}\n")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
