"""The transactional outbox and the status consumer's processed-message ledger."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import BigInteger, Identity, Index, Integer, LargeBinary, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from api.models.base import Base, CreatedAtMixin


class OutboxEvent(CreatedAtMixin, Base):
    """An event written in the same transaction as the change it describes."""

    __tablename__ = "outbox"
    __table_args__ = (
        # The relay's claim query scans only unsent rows, in id order.
        Index("ix_outbox_unsent", "id", postgresql_where=text("sent_at IS NULL")),
        Index("ix_outbox_sent_at", "sent_at", postgresql_where=text("sent_at IS NOT NULL")),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    event_id: Mapped[uuid.UUID] = mapped_column(unique=True)
    routing_key: Mapped[str] = mapped_column(String(255))
    # The CloudEvents envelope, serialised once when the event is written.
    body: Mapped[bytes] = mapped_column(LargeBinary)
    # The order the event is about: relays claim one order's events together, in order.
    # NULL only in rows written before the column existed (claimed as one partition).
    order_id: Mapped[uuid.UUID | None]
    correlation_id: Mapped[str | None] = mapped_column(String(128))
    # The W3C trace context of the request or message that wrote the event (tracing on),
    # so the relay's publish continues that trace whichever process publishes it.
    traceparent: Mapped[str | None] = mapped_column(String(55))
    tracestate: Mapped[str | None] = mapped_column(String(512))
    sent_at: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)


class ProcessedMessage(Base):
    """Status-queue `message_id`s already applied, so a redelivery is a no-op."""

    __tablename__ = "processed_messages"

    message_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    processed_at: Mapped[datetime] = mapped_column(server_default=text("now()"), index=True)


class HousekeepingLease(Base):
    """Who may run a fleet-wide job now: one row per job, claimed when it has expired."""

    __tablename__ = "housekeeping_leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))
    expires_at: Mapped[datetime]
