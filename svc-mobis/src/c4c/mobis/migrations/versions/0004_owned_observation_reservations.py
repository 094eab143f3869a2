"""Owned observations are reserved before they are sent to ingest and confirmed after, so
that an event about one that arrives in between is applied, not dropped.

Revision ID: mobis_0004
Revises: mobis_0003
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "mobis_0004"
down_revision = "mobis_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("owned_observations") as table:
        table.add_column(
            sa.Column("confirmed", sa.Boolean(), nullable=False, server_default=sa.true())
        )


def downgrade() -> None:
    with op.batch_alter_table("owned_observations") as table:
        table.drop_column("confirmed")
