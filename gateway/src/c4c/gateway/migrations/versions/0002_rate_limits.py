"""Rate limit state shared by gateway replicas.

Revision ID: gateway_0002
Revises: gateway_0001
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "gateway_0002"
down_revision = "gateway_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rate_limit_buckets",
        sa.Column("key", sa.String(300), primary_key=True),
        sa.Column("tokens", sa.Float, nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("allowed", sa.Boolean, nullable=False),
    )
    op.create_table(
        "rate_limit_windows",
        sa.Column("key", sa.String(300), primary_key=True),
        sa.Column("start", sa.BigInteger, nullable=False),
        sa.Column("used", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("rate_limit_windows")
    op.drop_table("rate_limit_buckets")
