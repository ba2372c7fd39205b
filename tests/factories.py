"""Plain async factories for test data."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.configs import Settings
from api.helpers.auth import create_access_token
from api.models import User

PASSWORD = "correct horse battery staple"


@dataclass(frozen=True)
class TestUser:
    __test__ = False  # not a test class, despite the name

    id: uuid.UUID
    email: str
    role: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


async def make_user(
    sessionmaker: async_sessionmaker[AsyncSession],
    settings: Settings,
    *,
    role: str = "user",
    email: str | None = None,
) -> TestUser:
    """Insert a user directly and mint an access token for it."""
    email = email or f"user-{uuid.uuid4().hex[:12]}@example.com"
    async with sessionmaker() as session, session.begin():
        user_id = (
            await session.execute(
                insert(User)
                .values(email=email, password_hash=_password_hash(), name="Test User", role=role)
                .returning(User.id)
            )
        ).scalar_one()
    token, _ = create_access_token(settings, user_id=user_id)
    return TestUser(id=user_id, email=email, role=role, token=token)


_HASH: str | None = None


def _password_hash() -> str:
    global _HASH
    if _HASH is None:
        from argon2 import PasswordHasher

        _HASH = PasswordHasher(time_cost=2, memory_cost=19_456, parallelism=1).hash(PASSWORD)
    return _HASH
