"""A MachineObservation may have no position: svc-video's detections carry none.

Revision ID: ingest_0002
Revises: ingest_0001
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "ingest_0002"
down_revision = "ingest_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("observations") as table:
        table.alter_column("latitude", existing_type=sa.Float, nullable=True)
        table.alter_column("longitude", existing_type=sa.Float, nullable=True)


def downgrade() -> None:
    with op.batch_alter_table("observations") as table:
        table.alter_column("latitude", existing_type=sa.Float, nullable=False)
        table.alter_column("longitude", existing_type=sa.Float, nullable=False)
