"""Observations, media and identifications.

Revision ID: ingest_0001
Revises:
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "ingest_0001"
down_revision = None
branch_labels = None
depends_on = None

SEQUENCE = sa.BigInteger().with_variant(sa.Integer, "sqlite")
WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "observations",
        sa.Column("seq", SEQUENCE, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(36), nullable=False, unique=True),
        sa.Column("occurrence_id", sa.String(500), nullable=False),
        sa.Column("idempotency_key", sa.String(255), unique=True),
        sa.Column("body_hash", sa.String(64), nullable=False),
        sa.Column("dataset_id", sa.String(200), nullable=False),
        sa.Column("recorded_by", sa.String(200), nullable=False),
        sa.Column("event_date", sa.String(80), nullable=False),
        sa.Column("event_start", WHEN, nullable=False),
        sa.Column("event_end", WHEN, nullable=False),
        sa.Column("latitude", sa.Float, nullable=False),
        sa.Column("longitude", sa.Float, nullable=False),
        sa.Column("coordinate_uncertainty", sa.Float),
        sa.Column("geodetic_datum", sa.String(20), nullable=False),
        sa.Column("country_code", sa.String(2)),
        sa.Column("scientific_name", sa.String(500)),
        sa.Column("scientific_name_lower", sa.String(500)),
        sa.Column("taxon_rank", sa.String(30)),
        sa.Column("vernacular_name", sa.String(500)),
        sa.Column("vernacular_name_lower", sa.String(500)),
        sa.Column("basis_of_record", sa.String(40), nullable=False),
        sa.Column("individual_count", sa.Integer),
        sa.Column("occurrence_status", sa.String(10), nullable=False),
        sa.Column("license", sa.String(20), nullable=False),
        sa.Column("degree_of_establishment", sa.String(30)),
        sa.Column("location_obscured", sa.Boolean, nullable=False),
        sa.Column("occurrence_remarks", sa.Text),
        sa.Column("measurements", sa.JSON, nullable=False),
        sa.Column("quality_score", sa.Float),
        sa.Column("quality_grade", sa.String(50)),
        sa.Column("quality_flags", sa.JSON),
        sa.Column("quality_assessed_at", WHEN),
        sa.Column("best_identification", sa.JSON),
        sa.Column("best_identification_at", WHEN),
        sa.Column("media_count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("version", sa.Integer, nullable=False, server_default="1"),
        sa.Column("created_at", WHEN, nullable=False),
        sa.Column("updated_at", WHEN, nullable=False),
        sa.Column("deleted_at", WHEN),
    )
    for name, columns in {
        "ix_observations_dataset_id": ["dataset_id"],
        "ix_observations_recorded_by": ["recorded_by"],
        "ix_observations_scientific_name_lower": ["scientific_name_lower"],
        "ix_observations_vernacular_name_lower": ["vernacular_name_lower"],
        "ix_observations_quality_grade": ["quality_grade"],
        "ix_observations_created": ["created_at", "seq"],
        "ix_observations_event": ["event_start", "seq"],
        "ix_observations_updated": ["updated_at", "seq"],
    }.items():
        op.create_index(name, "observations", columns)

    op.create_table(
        "media",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("observation_id", sa.String(36), nullable=False),
        sa.Column("kind", sa.String(10), nullable=False),
        sa.Column("media_type", sa.String(100), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("storage_key", sa.String(200)),
        sa.Column("public_key", sa.String(200)),
        sa.Column("public_sha256", sa.String(64)),
        sa.Column("external_url", sa.String(2000)),
        sa.Column("width", sa.Integer),
        sa.Column("height", sa.Integer),
        sa.Column("taken_at", sa.String(40)),
        sa.Column("exif_latitude", sa.Float),
        sa.Column("exif_longitude", sa.Float),
        sa.Column("created_at", WHEN, nullable=False),
    )
    op.create_index("ix_media_observation_id", "media", ["observation_id"])

    op.create_table(
        "identifications",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("observation_id", sa.String(36), nullable=False),
        sa.Column("identified_by", sa.String(200), nullable=False),
        sa.Column("scientific_name", sa.String(500), nullable=False),
        sa.Column("taxon_rank", sa.String(30)),
        sa.Column("vernacular_name", sa.String(500)),
        sa.Column("date_identified", WHEN, nullable=False),
        sa.Column("remarks", sa.Text),
        sa.Column("kind", sa.String(10), nullable=False),
        sa.Column("model_version", sa.String(100)),
        sa.Column("score", sa.Float),
        sa.Column("created_at", WHEN, nullable=False),
    )
    op.create_index("ix_identifications_observation_id", "identifications", ["observation_id"])


def downgrade() -> None:
    op.drop_table("identifications")
    op.drop_table("media")
    op.drop_table("observations")
