"""plantid: projects, species, references, imports, identifications, quota

Revision ID: plantid_0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "plantid_0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "plantid_projects",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("description", sa.Text),
        sa.Column("gallery_version", sa.Integer, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
    )
    op.create_table(
        "plantid_species",
        sa.Column("scientific_name", sa.String(300), primary_key=True),
        sa.Column("authorship", sa.String(300)),
        sa.Column("genus", sa.String(200)),
        sa.Column("family", sa.String(200)),
        sa.Column("taxon_rank", sa.String(30)),
        sa.Column("common_names", sa.JSON, nullable=False),
        sa.Column("gbif_id", sa.String(30)),
        sa.Column("inat_id", sa.Integer),
    )
    op.create_table(
        "plantid_references",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column(
            "project_id",
            sa.String(64),
            sa.ForeignKey("plantid_projects.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column(
            "scientific_name",
            sa.String(300),
            sa.ForeignKey("plantid_species.scientific_name"),
            nullable=False,
        ),
        sa.Column("organ", sa.String(20), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("media_key", sa.String(200), nullable=False),
        sa.Column("width", sa.Integer, nullable=False),
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("author", sa.String(200)),
        sa.Column("license", sa.String(200)),
        sa.Column("embedding", sa.LargeBinary, nullable=False),
        sa.Column("model_version", sa.String(100), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("project_id", "sha256", name="uq_plantid_ref_image"),
    )
    op.create_index("ix_plantid_references_project_id", "plantid_references", ["project_id"])
    op.create_table(
        "plantid_imports",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column(
            "project_id",
            sa.String(64),
            sa.ForeignKey("plantid_projects.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("format", sa.String(20), nullable=False),
        sa.Column("source", sa.String(1000), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("total", sa.Integer, nullable=False),
        sa.Column("done", sa.Integer, nullable=False),
        sa.Column("skipped", sa.Integer, nullable=False),
        sa.Column("failed", sa.Integer, nullable=False),
        sa.Column("errors", sa.JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("finished_at", TS),
    )
    op.create_table(
        "plantid_identifications",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("project_id", sa.String(64), nullable=False),
        sa.Column("observation_id", sa.String(64)),
        sa.Column("model_version", sa.String(100), nullable=False),
        sa.Column("gallery_version", sa.String(100), nullable=False),
        sa.Column("rejected", sa.Boolean, nullable=False),
        sa.Column("result", sa.JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_index(
        "ix_plantid_identifications_project_id", "plantid_identifications", ["project_id"]
    )
    op.create_index(
        "ix_plantid_identifications_observation_id", "plantid_identifications", ["observation_id"]
    )
    op.create_table(
        "plantid_quota",
        sa.Column("caller", sa.String(64), primary_key=True),
        sa.Column("day", sa.String(10), primary_key=True),
        sa.Column("used", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    for table in (
        "plantid_quota",
        "plantid_identifications",
        "plantid_imports",
        "plantid_references",
        "plantid_species",
        "plantid_projects",
    ):
        op.drop_table(table)
