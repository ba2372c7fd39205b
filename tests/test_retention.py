"""The retention sweep: expired refresh tokens and old status-message ids go, the rest stays.

(Its idempotency-record part is tested with the idempotency keys.)
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from datetime import timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.configs import Settings
from api.database.connection import create_engine, create_sessionmaker
from api.services.retention_sweeper import PROCESSED_MESSAGE_RETENTION, RetentionSweeper
from tests.event_helpers import scratch_events_environment
from tests.factories import TestUser

Sessionmaker = async_sessionmaker[AsyncSession]


async def _insert_token(
    sessionmaker: Sessionmaker, user_id: uuid.UUID, expires_in: timedelta
) -> uuid.UUID:
    token_id = uuid.uuid4()
    async with sessionmaker() as session, session.begin():
        await session.execute(
            text(
                "INSERT INTO refresh_tokens (id, user_id, family_id, token_hash, expires_at)"
                " VALUES (:id, :user_id, :family_id, :hash, now() + :expires_in)"
            ),
            {
                "id": token_id,
                "user_id": user_id,
                "family_id": uuid.uuid4(),
                "hash": hashlib.sha256(token_id.bytes).digest(),
                "expires_in": expires_in,
            },
        )
    return token_id


async def _token_ids(sessionmaker: Sessionmaker, user_id: uuid.UUID) -> set[uuid.UUID]:
    async with sessionmaker() as session:
        rows = await session.execute(
            text("SELECT id FROM refresh_tokens WHERE user_id = :id"), {"id": user_id}
        )
        return {row.id for row in rows}


async def _insert_message(sessionmaker: Sessionmaker, age: timedelta) -> str:
    message_id = f"retention-{uuid.uuid4()}"
    async with sessionmaker() as session, session.begin():
        await session.execute(
            text(
                "INSERT INTO processed_messages (message_id, processed_at)"
                " VALUES (:id, now() - CAST(:age AS interval))"
            ),
            {"id": message_id, "age": age},
        )
    return message_id


async def _known_messages(sessionmaker: Sessionmaker, ids: list[str]) -> set[str]:
    async with sessionmaker() as session:
        rows = await session.execute(
            text("SELECT message_id FROM processed_messages WHERE message_id = ANY(:ids)"),
            {"ids": ids},
        )
        return {row.message_id for row in rows}


async def test_sweep_deletes_expired_refresh_tokens_only(
    user: TestUser, sessionmaker: Sessionmaker
) -> None:
    expired = {await _insert_token(sessionmaker, user.id, timedelta(seconds=-1)) for _ in range(5)}
    live = await _insert_token(sessionmaker, user.id, timedelta(days=1))

    deleted = await RetentionSweeper(sessionmaker, batch_size=2).sweep()

    assert deleted["refresh_tokens"] >= len(expired)  # other tests' expired tokens go too
    assert await _token_ids(sessionmaker, user.id) == {live}


async def test_sweep_forgets_status_message_ids_past_the_retention(
    sessionmaker: Sessionmaker,
) -> None:
    old = [await _insert_message(sessionmaker, PROCESSED_MESSAGE_RETENTION + timedelta(hours=1))]
    recent = [await _insert_message(sessionmaker, PROCESSED_MESSAGE_RETENTION - timedelta(hours=1))]

    deleted = await RetentionSweeper(sessionmaker).sweep()

    assert deleted["processed_messages"] >= 1
    assert await _known_messages(sessionmaker, old + recent) == set(recent)


async def test_many_processes_sweep_once_per_interval_between_them(settings: Settings) -> None:
    """The lease: four sweepers (processes of a fleet) share one sweep per interval."""
    async with scratch_events_environment(settings) as scratch:
        engine = create_engine(scratch)
        sweepers = [RetentionSweeper(create_sessionmaker(engine), interval=0.5) for _ in range(4)]
        try:
            for sweeper in sweepers:
                sweeper.start()
            await asyncio.sleep(3.0)
        finally:
            for sweeper in sweepers:
                await sweeper.close()
            await engine.dispose()
    sweeps = [sweeper.sweeps for sweeper in sweepers]
    # Without the lease each would sweep every 0.5 s: about 24 in all.
    assert 3 <= sum(sweeps) <= 7, sweeps
