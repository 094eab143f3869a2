"""The outbox's index: the unpublished rows only, in id order (what the relay reads).

On ``published_at``, the relay found its rows through every NULL entry, those of the rows
published since the last vacuum included, then sorted them: each pass cost more than the
one before (6 times the work after 80,000 events, measured). Read in id order, a pass stops
at its batch, and an entry found dead is marked so and skipped from then on.

Revision ID: c4c_shared_0002
Revises: c4c_shared_0001
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "c4c_shared_0002"
down_revision = "c4c_shared_0001"
branch_labels = None
depends_on = None

UNPUBLISHED = sa.text("published_at IS NULL")


def upgrade() -> None:
    op.drop_index("ix_c4c_outbox_published_at", "c4c_outbox")
    op.create_index(
        "ix_c4c_outbox_unpublished",
        "c4c_outbox",
        ["id"],
        postgresql_where=UNPUBLISHED,
        sqlite_where=UNPUBLISHED,
    )


def downgrade() -> None:
    op.drop_index("ix_c4c_outbox_unpublished", "c4c_outbox")
    op.create_index("ix_c4c_outbox_published_at", "c4c_outbox", ["published_at"])
