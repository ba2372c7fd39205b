"""The background event workers of an API process: the outbox relay and the status consumer."""

from __future__ import annotations

import asyncio

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.configs import Settings
from api.consumers.status import OnApplied, StatusConsumer
from api.rabbit_core.client import RabbitClient
from api.relay.outbox_relay import OutboxRelay


class EventWorkers:
    """Started after the clients open, stopped before they close (each finishing its work)."""

    def __init__(
        self,
        settings: Settings,
        sessionmaker: async_sessionmaker[AsyncSession],
        rabbit: RabbitClient,
        *,
        on_status_applied: OnApplied | None = None,
    ) -> None:
        self.relay = (
            OutboxRelay(settings, sessionmaker, rabbit) if settings.OUTBOX_RELAY_ENABLED else None
        )
        self.status_consumer = (
            StatusConsumer(settings, sessionmaker, rabbit, on_applied=on_status_applied)
            if settings.STATUS_CONSUMER_ENABLED
            else None
        )

    async def start(self) -> None:
        """Start both without waiting for RabbitMQ; each attaches when it connects."""
        if self.relay is not None:
            await self.relay.start()
        if self.status_consumer is not None:
            await self.status_consumer.start()

    async def stop(self) -> None:
        """Stop consuming and relaying; in-flight messages and the batch in hand finish first."""
        stopping = [worker.stop() for worker in (self.status_consumer, self.relay) if worker]
        await asyncio.gather(*stopping)
