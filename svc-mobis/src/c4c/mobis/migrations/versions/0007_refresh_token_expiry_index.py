"""Refresh tokens by expiry: every rotation leaves one behind for good, and the hourly
pruning finds those expired a lifetime ago through this index.

Revision ID: mobis_0007
Revises: mobis_0006
Create Date: 2026-11-24
"""

from alembic import op

revision = "mobis_0007"
down_revision = "mobis_0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_refresh_tokens_expires_at", "refresh_tokens", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_refresh_tokens_expires_at", table_name="refresh_tokens")
