"""Keep the W3C trace context of the change that wrote each outbox event.

The relay's publish span continues it, whichever process publishes the row (SPEC §14).

Revision ID: 7a4e2c9d1b06
Revises: 5c1d7e3a9f20
Create Date: 2026-11-28 19:45:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "7a4e2c9d1b06"
down_revision: str | None = "5c1d7e3a9f20"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("outbox", sa.Column("traceparent", sa.String(length=55), nullable=True))
    op.add_column("outbox", sa.Column("tracestate", sa.String(length=512), nullable=True))


def downgrade() -> None:
    op.drop_column("outbox", "tracestate")
    op.drop_column("outbox", "traceparent")
