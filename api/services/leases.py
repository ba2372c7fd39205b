"""Fleet-wide housekeeping: a job runs in one process at a time, once per period."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.database.query.leases import claim_lease, release_lease

logger = logging.getLogger(__name__)

# Bounds giving a lease up on shutdown, so a database that went away cannot hold it up.
RELEASE_TIMEOUT = 2.0


def lease_holder() -> str:
    """This process, as a lease row names it (host and pid)."""
    return f"{socket.gethostname()}:{os.getpid()}"


async def take_lease(
    sessionmaker: async_sessionmaker[AsyncSession], *, name: str, period: timedelta
) -> bool:
    """Whether this process may run job `name` now; if so, nobody else may for `period`.

    Every process asks every so often; the first to ask after the lease expired gets
    it, so the job runs about once per period in the whole fleet, not in every process.
    """
    async with sessionmaker() as session, session.begin():
        return await claim_lease(session, name=name, holder=lease_holder(), period=period)


async def give_up_lease(sessionmaker: async_sessionmaker[AsyncSession], *, name: str) -> None:
    """On a clean stop: let the next process run job `name` without waiting for the lease."""

    async def release() -> None:
        async with sessionmaker() as session, session.begin():
            await release_lease(session, name=name, holder=lease_holder())

    with contextlib.suppress(Exception):  # it expires by itself anyway
        await asyncio.wait_for(release(), RELEASE_TIMEOUT)
