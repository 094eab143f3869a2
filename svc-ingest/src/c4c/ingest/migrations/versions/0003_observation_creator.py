"""Who created an observation: an id or Idempotency-Key retried by another client is a
conflict, not a replay (a replay would tell a stranger it had created the observation).
Observations stored before are nobody's to retry ("unknown"): a creator's retry that spans
the upgrade gets a 409, where leaving them open would leave every one of them claimable.

Revision ID: ingest_0003
Revises: ingest_0002
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "ingest_0003"
down_revision = "ingest_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("observations") as table:
        table.add_column(sa.Column("created_by", sa.String(300), nullable=True))
    op.execute("UPDATE observations SET created_by = 'unknown'")
    with op.batch_alter_table("observations") as table:
        table.alter_column("created_by", existing_type=sa.String(300), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("observations") as table:
        table.drop_column("created_by")
