"""Streams, jobs and detections.

Revision ID: video_0001
Revises:
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "video_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "video_streams",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("desired", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("counts", sa.JSON, nullable=False),
        sa.Column("stats", sa.JSON, nullable=False),
        sa.Column("owner", sa.String(64)),
        sa.Column("lease_until", sa.DateTime(timezone=True)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "video_jobs",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("filename", sa.String(300)),
        sa.Column("media_name", sa.String(200), nullable=False),
        sa.Column("content_type", sa.String(200)),
        sa.Column("size_bytes", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("progress", sa.Float, nullable=False),
        sa.Column("frames_declared", sa.Integer),
        sa.Column("frames_decoded", sa.Integer, nullable=False),
        sa.Column("frames_analysed", sa.Integer, nullable=False),
        sa.Column("duration_seconds", sa.Float),
        sa.Column("detections", sa.Integer, nullable=False),
        sa.Column("classification", sa.String(16)),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("owner", sa.String(64)),
        sa.Column("lease_until", sa.DateTime(timezone=True)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
    )
    op.create_index("ix_video_jobs_status", "video_jobs", ["status"])
    op.create_table(
        "video_detections",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column(
            "stream_id", sa.String(36), sa.ForeignKey("video_streams.id", ondelete="SET NULL")
        ),
        sa.Column("job_id", sa.String(36), sa.ForeignKey("video_jobs.id", ondelete="CASCADE")),
        sa.Column("source_key", sa.String(64), nullable=False),
        sa.Column("track_id", sa.Integer, nullable=False),
        sa.Column("start_seconds", sa.Float, nullable=False),
        sa.Column("end_seconds", sa.Float, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("ended_at", sa.DateTime(timezone=True)),
        sa.Column("boxes", sa.JSON, nullable=False),
        sa.Column("keyframe_box", sa.JSON, nullable=False),
        sa.Column("keyframe_seconds", sa.Float, nullable=False),
        sa.Column("keyframe_name", sa.String(200), nullable=False),
        sa.Column("clip_name", sa.String(200)),
        sa.Column("frame_width", sa.Integer, nullable=False),
        sa.Column("frame_height", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("job_id", "source_key", name="uq_video_detections_job_key"),
    )
    op.create_index("ix_video_detections_stream_id", "video_detections", ["stream_id"])
    op.create_index("ix_video_detections_job_id", "video_detections", ["job_id"])
    op.create_index("ix_video_detections_started_at", "video_detections", ["started_at"])
    op.create_index("ix_video_detections_created_at", "video_detections", ["created_at"])


def downgrade() -> None:
    op.drop_table("video_detections")
    op.drop_index("ix_video_jobs_status", "video_jobs")
    op.drop_table("video_jobs")
    op.drop_table("video_streams")
