"""Deleting in small batches: the shape every retention job shares."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, delete, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute


async def delete_batch(
    session: AsyncSession,
    key: tuple[InstrumentedAttribute[Any], ...],
    *criteria: ColumnElement[bool],
    limit: int,
) -> int:
    """Delete up to `limit` rows matching `criteria`; the number deleted.

    `key` is the table's primary key. Rows another transaction holds are skipped
    (`SKIP LOCKED`), so a sweep never waits behind a request and several processes
    can sweep at once. The delete runs without session synchronisation: no ORM
    object is kept in step, so no identity is worked out per deleted row.
    """
    doomed = select(*key).where(*criteria).limit(limit).with_for_update(skip_locked=True)
    target = key[0].in_(doomed.scalar_subquery()) if len(key) == 1 else tuple_(*key).in_(doomed)
    result = await session.execute(
        delete(key[0].class_).where(target).execution_options(synchronize_session=False)
    )
    deleted: int = result.rowcount  # type: ignore[attr-defined]
    return deleted
