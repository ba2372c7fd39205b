"""SQL for users and refresh tokens."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from api.models import User


async def get_user(session: AsyncSession, *, user_id: uuid.UUID) -> User | None:
    return await session.get(User, user_id)


async def get_user_role(session: AsyncSession, *, user_id: uuid.UUID) -> str | None:
    """The user's current role, or None when the user no longer exists."""
    result = await session.execute(select(User.role).where(User.id == user_id))
    return result.scalar_one_or_none()
