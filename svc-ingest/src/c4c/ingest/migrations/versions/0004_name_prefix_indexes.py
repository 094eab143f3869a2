"""The name filter (a case-insensitive prefix: ``LIKE 'quer%'``) gets indexes PostgreSQL can
use for it: under a collation other than C a plain B-tree index serves no LIKE, so every
name search read the whole table. SQLite is left as it is.

Revision ID: ingest_0004
Revises: ingest_0003
Create Date: 2026-11-24
"""

from alembic import op

revision = "ingest_0004"
down_revision = "ingest_0003"
branch_labels = None
depends_on = None

COLUMNS = ("scientific_name_lower", "vernacular_name_lower")


def _rebuild(ops: str | None) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for column in COLUMNS:
        name = f"ix_observations_{column}"
        op.drop_index(name, table_name="observations")
        op.create_index(name, "observations", [column], postgresql_ops={column: ops} if ops else {})


def upgrade() -> None:
    _rebuild("varchar_pattern_ops")


def downgrade() -> None:
    _rebuild(None)
