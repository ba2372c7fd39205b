"""Index refresh tokens by expiry, for the retention sweep that deletes expired ones.

Revision ID: 5c1d7e3a9f20
Revises: b9e072d1b3fe
Create Date: 2026-11-22 17:30:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "5c1d7e3a9f20"
down_revision: str | None = "b9e072d1b3fe"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_refresh_tokens_expires_at", "refresh_tokens", ["expires_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_refresh_tokens_expires_at", table_name="refresh_tokens")
