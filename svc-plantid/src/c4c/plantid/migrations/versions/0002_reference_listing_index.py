"""A project's references by species, in the listing's order: the listing sorted all of a
project's references (61 ms at 270,000 on PostgreSQL, 526 on SQLite; 0.3 so), a species'
page read the whole table (41 ms; 0.1), and a change to a species' description looked for
the projects holding it the same way (40 ms; 0.2). It takes over from the index on the
project alone.

Revision ID: plantid_0002
Revises: plantid_0001
Create Date: 2026-11-24
"""

from alembic import op

revision = "plantid_0002"
down_revision = "plantid_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_plantid_references_listing",
        "plantid_references",
        ["project_id", "scientific_name", "created_at", "id"],
    )
    op.drop_index("ix_plantid_references_project_id", table_name="plantid_references")


def downgrade() -> None:
    op.create_index("ix_plantid_references_project_id", "plantid_references", ["project_id"])
    op.drop_index("ix_plantid_references_listing", table_name="plantid_references")
