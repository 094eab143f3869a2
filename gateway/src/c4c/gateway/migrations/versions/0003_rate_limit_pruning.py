"""Indexes that let pruning find idle buckets and ended windows without a scan.

Revision ID: gateway_0003
Revises: gateway_0002
Create Date: 2026-11-24
"""

from alembic import op

revision = "gateway_0003"
down_revision = "gateway_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_rate_limit_buckets_at", "rate_limit_buckets", ["at"])
    op.create_index("ix_rate_limit_windows_start", "rate_limit_windows", ["start"])


def downgrade() -> None:
    op.drop_index("ix_rate_limit_windows_start", "rate_limit_windows")
    op.drop_index("ix_rate_limit_buckets_at", "rate_limit_buckets")
