"""The reservations a sync left unconfirmed are settled in the background: a partial index
finds the old ones without reading every owned observation.

Revision ID: mobis_0005
Revises: mobis_0004
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "mobis_0005"
down_revision = "mobis_0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_owned_unconfirmed",
        "owned_observations",
        ["updated_at"],
        postgresql_where=sa.text("confirmed = false"),
        sqlite_where=sa.text("confirmed = 0"),
    )


def downgrade() -> None:
    op.drop_index("ix_owned_unconfirmed", table_name="owned_observations")
