"""Outbox rows name their order; a lease table for fleet-wide housekeeping.

Relays claim the events of a set of orders together (partitions of the order id,
under transaction-scoped advisory locks), so one order's events are published in
order whatever the number of relays. Existing rows get their order id from the
envelope's `subject`. `housekeeping_leases` lets one process of the fleet at a
time run outbox cleanup and retention sweeps (a row, not a session lock, so it
works behind PgBouncer in transaction mode).

Revision ID: 7a3e5c2d9b41
Revises: 7a4e2c9d1b06
Create Date: 2026-11-28 20:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "7a3e5c2d9b41"
down_revision: str | None = "7a4e2c9d1b06"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("outbox", sa.Column("order_id", sa.Uuid(), nullable=True))
    # Only unsent rows matter to the relays; a subject that is not a UUID stays NULL.
    op.execute(
        """
        UPDATE outbox SET order_id = (convert_from(body, 'UTF8')::jsonb ->> 'subject')::uuid
        WHERE sent_at IS NULL
          AND convert_from(body, 'UTF8')::jsonb ->> 'subject'
              ~ '^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$'
        """
    )
    op.create_table(
        "housekeeping_leases",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("holder", sa.String(length=255), nullable=False),
        sa.Column("expires_at", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_housekeeping_leases")),
    )


def downgrade() -> None:
    op.drop_table("housekeeping_leases")
    op.drop_column("outbox", "order_id")
