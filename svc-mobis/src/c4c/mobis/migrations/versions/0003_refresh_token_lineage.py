"""Refresh tokens remember the token they were rotated from (for the grace period of a
repeated refresh) and when the user last really authenticated (for steps that need a fresh
sign-in).

Revision ID: mobis_0003
Revises: mobis_0002
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "mobis_0003"
down_revision = "mobis_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("refresh_tokens") as table:
        table.add_column(sa.Column("parent_id", sa.String(36)))
        table.add_column(sa.Column("auth_time", sa.DateTime(timezone=True)))
        table.create_index("ix_refresh_tokens_parent_id", ["parent_id"])


def downgrade() -> None:
    with op.batch_alter_table("refresh_tokens") as table:
        table.drop_index("ix_refresh_tokens_parent_id")
        table.drop_column("auth_time")
        table.drop_column("parent_id")
