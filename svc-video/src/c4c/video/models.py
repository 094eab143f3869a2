"""Tables of the video service: streams, jobs (uploaded clips) and their detections."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    desc,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class StreamRow(Base):
    __tablename__ = "video_streams"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    url: Mapped[str] = mapped_column(Text)
    desired: Mapped[str] = mapped_column(String(16))  # running | paused | stopped
    status: Mapped[str] = mapped_column(String(16))  # what the worker reports
    reason: Mapped[str | None] = mapped_column(Text)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)  # lines, zones
    counts: Mapped[dict[str, Any]] = mapped_column(JSON)
    stats: Mapped[dict[str, Any]] = mapped_column(JSON)
    owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class JobRow(Base):
    __tablename__ = "video_jobs"
    # The listing's order, all jobs or those of a status (which the claim reads too).
    __table_args__ = (
        Index("ix_video_jobs_created", desc("created_at"), "id"),
        Index("ix_video_jobs_status_created", "status", desc("created_at"), "id"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    filename: Mapped[str | None] = mapped_column(String(300))
    media_name: Mapped[str] = mapped_column(String(200))
    content_type: Mapped[str | None] = mapped_column(String(200))
    size_bytes: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))  # queued running succeeded failed
    reason: Mapped[str | None] = mapped_column(Text)
    progress: Mapped[float] = mapped_column(Float)
    frames_declared: Mapped[int | None] = mapped_column(Integer)
    frames_decoded: Mapped[int] = mapped_column(Integer)
    frames_analysed: Mapped[int] = mapped_column(Integer)
    duration_seconds: Mapped[float | None] = mapped_column(Float)
    detections: Mapped[int] = mapped_column(Integer)
    classification: Mapped[str | None] = mapped_column(String(16))  # empty | events
    attempts: Mapped[int] = mapped_column(Integer)
    owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class DetectionRow(Base):
    __tablename__ = "video_detections"
    __table_args__ = (UniqueConstraint("job_id", "source_key", name="uq_video_detections_job_key"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    stream_id: Mapped[str | None] = mapped_column(
        ForeignKey("video_streams.id", ondelete="SET NULL"), index=True
    )
    job_id: Mapped[str | None] = mapped_column(
        ForeignKey("video_jobs.id", ondelete="CASCADE"), index=True
    )
    source_key: Mapped[str] = mapped_column(String(64))  # first frame:track: stable on a rerun
    track_id: Mapped[int] = mapped_column(Integer)
    start_seconds: Mapped[float] = mapped_column(Float)
    end_seconds: Mapped[float] = mapped_column(Float)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    boxes: Mapped[list[Any]] = mapped_column(JSON)
    keyframe_box: Mapped[list[float]] = mapped_column(JSON)
    keyframe_seconds: Mapped[float] = mapped_column(Float)
    keyframe_name: Mapped[str] = mapped_column(String(200))
    clip_name: Mapped[str | None] = mapped_column(String(200))
    frame_width: Mapped[int] = mapped_column(Integer)
    frame_height: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
