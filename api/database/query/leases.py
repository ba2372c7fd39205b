"""SQL for housekeeping leases: one process of the fleet runs a job per lease period."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete, func
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from api.models import HousekeepingLease


async def claim_lease(session: AsyncSession, *, name: str, holder: str, period: timedelta) -> bool:
    """Take lease `name` for `period` when it is free or expired; whether `holder` got it.

    One statement: the primary key and the conditional update settle racing processes
    (the loser's update matches no row), with no session state, so it works behind
    PgBouncer in transaction mode.
    """
    insert = pg_insert(HousekeepingLease).values(
        name=name, holder=holder, expires_at=func.now() + period
    )
    claim = insert.on_conflict_do_update(
        index_elements=[HousekeepingLease.name],
        set_={"holder": insert.excluded.holder, "expires_at": insert.excluded.expires_at},
        where=HousekeepingLease.expires_at <= func.now(),
    ).returning(HousekeepingLease.holder)
    result = await session.execute(claim)
    return result.first() is not None


async def release_lease(session: AsyncSession, *, name: str, holder: str) -> None:
    """Give lease `name` up if `holder` has it, so the next process need not wait it out."""
    await session.execute(
        delete(HousekeepingLease).where(
            HousekeepingLease.name == name, HousekeepingLease.holder == holder
        )
    )
