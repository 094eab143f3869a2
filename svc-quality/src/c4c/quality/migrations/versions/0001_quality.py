"""Seen observations, assessments, rule sets, photo analyses, machine identifications.

Revision ID: quality_0001
Revises:
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "quality_0001"
down_revision = None
branch_labels = None
depends_on = None

WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "observations",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("project", sa.String(200), nullable=False, index=True),
        sa.Column("recorded_by", sa.String(200), index=True),
        sa.Column("taxon", sa.String(500), index=True),
        sa.Column("latitude", sa.Float),
        sa.Column("longitude", sa.Float),
        sa.Column("day_of_year", sa.Integer),
        sa.Column("grade", sa.String(20), index=True),
        sa.Column("body", sa.JSON, nullable=False),
        sa.Column("measurements", sa.JSON, nullable=False),
        sa.Column("deleted", sa.Boolean, nullable=False),
        sa.Column("updated_at", WHEN, nullable=False, index=True),
    )
    op.create_table(
        "assessments",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("observation_id", sa.String(64), nullable=False, index=True),
        sa.Column("observation_version", sa.Integer),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("grade", sa.String(20), nullable=False),
        sa.Column("flags", sa.JSON, nullable=False),
        sa.Column("community_taxon", sa.JSON),
        sa.Column("ruleset_project", sa.String(200), nullable=False),
        sa.Column("ruleset_version", sa.Integer, nullable=False),
        sa.Column("created_at", WHEN, nullable=False),
    )
    op.create_table(
        "rulesets",
        sa.Column("project", sa.String(200), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("body", sa.JSON, nullable=False),
        sa.Column("created_at", WHEN, nullable=False),
    )
    op.create_table(
        "images",
        sa.Column("media_id", sa.String(64), primary_key=True),
        sa.Column("observation_id", sa.String(64), nullable=False, index=True),
        sa.Column("recorded_by", sa.String(200)),
        sa.Column("facts", sa.JSON, nullable=False),
        sa.Column("phash", sa.BigInteger),
        *(sa.Column(f"band{i}", sa.Integer, index=True) for i in range(4)),
    )
    op.create_table(
        "machine_ids",
        sa.Column("observation_id", sa.String(64), primary_key=True),
        sa.Column("body", sa.JSON, nullable=False),
        sa.Column("identified_at", WHEN, nullable=False),
    )
