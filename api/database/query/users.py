"""SQL for users and refresh tokens."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import NamedTuple

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from api.database.query.batches import delete_batch
from api.helpers.enums import UserRole
from api.models import RefreshToken, User


class Credentials(NamedTuple):
    user_id: uuid.UUID
    password_hash: str


class TokenFamily(NamedTuple):
    user_id: uuid.UUID
    family_id: uuid.UUID


async def get_user(session: AsyncSession, *, user_id: uuid.UUID) -> User | None:
    return await session.get(User, user_id)


async def get_user_role(session: AsyncSession, *, user_id: uuid.UUID) -> str | None:
    """The user's current role, or None when the user no longer exists."""
    result = await session.execute(select(User.role).where(User.id == user_id))
    return result.scalar_one_or_none()


async def get_credentials(session: AsyncSession, *, email: str) -> Credentials | None:
    """The id and password hash of the user with `email` (already lower-cased)."""
    result = await session.execute(select(User.id, User.password_hash).where(User.email == email))
    row = result.one_or_none()
    return Credentials(row.id, row.password_hash) if row is not None else None


async def insert_user(
    session: AsyncSession, *, email: str, password_hash: str, name: str | None
) -> User | None:
    """Insert a user; None when the email is taken.

    The unique index decides (ON CONFLICT), so two concurrent registrations of one
    address cannot both succeed, and the loser does not abort the request's transaction.
    """
    statement = (
        insert(User)
        .values(email=email, password_hash=password_hash, name=name)
        .on_conflict_do_nothing(index_elements=[User.email])
        .returning(User)
    )
    return (await session.scalars(statement)).one_or_none()


async def set_user_role(session: AsyncSession, *, email: str, role: UserRole) -> bool:
    """Give the user with `email` (already lower-cased) `role`; False when there is none."""
    result = await session.execute(
        update(User)
        .where(User.email == email)
        .values(role=role.value)
        .returning(User.id)
        .execution_options(synchronize_session=False)
    )
    return result.first() is not None


async def replace_password_hash(
    session: AsyncSession, *, user_id: uuid.UUID, old_hash: str, new_hash: str
) -> None:
    """Store a rehashed password unless the password changed in the meantime."""
    await session.execute(
        update(User)
        .where(User.id == user_id, User.password_hash == old_hash)
        .values(password_hash=new_hash, updated_at=func.now())
        .execution_options(synchronize_session=False)
    )


async def insert_refresh_token(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    family_id: uuid.UUID,
    token_hash: bytes,
    lifetime: timedelta,
) -> None:
    await session.execute(
        insert(RefreshToken).values(
            id=uuid.uuid4(),
            user_id=user_id,
            family_id=family_id,
            token_hash=token_hash,
            expires_at=func.now() + lifetime,
        )
    )


async def spend_refresh_token(session: AsyncSession, *, token_hash: bytes) -> TokenFamily | None:
    """Mark a live refresh token used and return its family; None when it is not live.

    One conditional UPDATE: of two concurrent uses of one token, the second waits for the
    first's row lock, then no longer matches `used_at IS NULL`.
    """
    result = await session.execute(
        update(RefreshToken)
        .where(
            RefreshToken.token_hash == token_hash,
            RefreshToken.used_at.is_(None),
            RefreshToken.revoked_at.is_(None),
            RefreshToken.expires_at > func.now(),
        )
        .values(used_at=func.now())
        .returning(RefreshToken.user_id, RefreshToken.family_id)
        .execution_options(synchronize_session=False)
    )
    row = result.one_or_none()
    return TokenFamily(row.user_id, row.family_id) if row is not None else None


async def revoke_family_of_spent_token(
    session: AsyncSession, *, token_hash: bytes
) -> TokenFamily | None:
    """Revoke every token of the family of an already used token; None when nothing changed."""
    spent_family = (
        select(RefreshToken.family_id)
        .where(RefreshToken.token_hash == token_hash, RefreshToken.used_at.is_not(None))
        .scalar_subquery()
    )
    result = await session.execute(
        update(RefreshToken)
        .where(RefreshToken.family_id == spent_family, RefreshToken.revoked_at.is_(None))
        .values(revoked_at=func.now())
        .returning(RefreshToken.user_id, RefreshToken.family_id)
        .execution_options(synchronize_session=False)
    )
    row = result.first()
    return TokenFamily(row.user_id, row.family_id) if row is not None else None


async def revoke_family_of_user_token(
    session: AsyncSession, *, token_hash: bytes, user_id: uuid.UUID
) -> None:
    """Revoke the family of `user_id`'s token; another user's token is left alone."""
    family = (
        select(RefreshToken.family_id)
        .where(RefreshToken.token_hash == token_hash, RefreshToken.user_id == user_id)
        .scalar_subquery()
    )
    await session.execute(
        update(RefreshToken)
        .where(RefreshToken.family_id == family, RefreshToken.revoked_at.is_(None))
        .values(revoked_at=func.now())
        .execution_options(synchronize_session=False)
    )


async def delete_expired_refresh_tokens(session: AsyncSession, *, batch_size: int) -> int:
    """Delete up to `batch_size` expired refresh tokens (an expired token is refused
    whatever its row says); rows a request holds are skipped. The number deleted."""
    return await delete_batch(
        session, (RefreshToken.id,), RefreshToken.expires_at < func.now(), limit=batch_size
    )
