"""Partial indexes for what grows without end: a user's unread notifications (counted with
every page of them and marked read: 22 ms through all of a user's 60,000 at 300,000 rows on
PostgreSQL, 0.06 ms so) and the observations of deleted accounts still to pseudonymise
(every 30 s, through every one forgotten already: 26-35 ms, 0.03 ms so).

Revision ID: mobis_0006
Revises: mobis_0005
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "mobis_0006"
down_revision = "mobis_0005"
branch_labels = None
depends_on = None

UNREAD = sa.text("read_at IS NULL")
AWAITING = sa.text("pseudonym IS NOT NULL")


def upgrade() -> None:
    op.create_index(
        "ix_notifications_unread",
        "notifications",
        ["user_id", "seq"],
        postgresql_where=UNREAD,
        sqlite_where=UNREAD,
    )
    op.create_index(
        "ix_owned_awaiting_pseudonym",
        "owned_observations",
        ["user_id", "seq"],
        postgresql_where=AWAITING,
        sqlite_where=AWAITING,
    )


def downgrade() -> None:
    op.drop_index("ix_owned_awaiting_pseudonym", table_name="owned_observations")
    op.drop_index("ix_notifications_unread", table_name="notifications")
