"""What the video API does: streams, jobs and detections, and the events they publish.
No HTTP and no SQL here: queries are in ``repository``, routes in ``api``."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from c4c.shared.app import ServiceRuntime
from c4c.shared.problems import Conflict, NotFound, ProblemError
from c4c.shared.urls import UnsafeURL, URLPolicy, check_url
from c4c.video import repository
from c4c.video.analysis.counting import Counters, LineCounter, ZoneCounter
from c4c.video.analysis.events import EventParams
from c4c.video.analysis.pipeline import AnalysisParams, DetectedEvent
from c4c.video.analysis.tracking import Box
from c4c.video.metrics import DETECTIONS, JOBS
from c4c.video.models import DetectionRow, JobRow, StreamRow
from c4c.video.schemas import DetectionOut, JobOut, StreamIn, StreamOut, StreamPatch
from c4c.video.settings import VideoSettings
from c4c.video.storage import MediaStore, TooLarge

API = "/video/v1"


class UnsafeSource(ProblemError):
    status, code, title = 422, "unsafe-url", "This source URL is not allowed"


class InvalidUpload(ProblemError):
    status, code, title = 400, "invalid-upload", "The upload is not usable"


class UploadTooLarge(ProblemError):
    status, code, title = 413, "body-too-large", "Content Too Large"


class NoSnapshot(ProblemError):
    status, code, title = 409, "no-snapshot", "No frame from this stream yet"


class TooManyStreams(Conflict):
    code, title = "too-many-streams", "Too many streams"


def now() -> datetime:
    return datetime.now(UTC)


def analysis_params(settings: VideoSettings) -> AnalysisParams:
    return AnalysisParams(
        analysis_fps=settings.analysis_fps,
        analysis_width=settings.analysis_width,
        subtractor=settings.subtractor,
        learning_rate=settings.learning_rate,
        var_threshold=settings.var_threshold,
        min_area=settings.min_area,
        events=EventParams(
            min_seconds=settings.min_event_seconds, max_seconds=settings.max_event_seconds
        ),
        clip_width=settings.clip_width,
        clip_fps=settings.clip_fps,
        clip_max_seconds=settings.clip_seconds,
        output_niceness=settings.output_niceness,
    )


def url_policy(settings: VideoSettings) -> URLPolicy:
    return URLPolicy(
        allowed_hosts=tuple(settings.allowed_hosts),
        file_root=settings.file_root,
        max_redirects=settings.max_redirects,
        timeout=settings.open_timeout,
        settings_prefix="C4C_VIDEO_",
    )


def counters_of(config: dict[str, Any]) -> Counters:
    return Counters(
        lines=[
            LineCounter(line["name"], tuple(line["points"][0]), tuple(line["points"][1]))
            for line in config.get("lines", [])
        ],
        zones=[
            ZoneCounter(zone["name"], [tuple(p) for p in zone["polygon"]])
            for zone in config.get("zones", [])
        ],
    )


# Shapes of answers and events


def stream_out(row: StreamRow) -> StreamOut:
    return StreamOut(
        id=row.id,
        name=row.name,
        url=row.url,
        lines=row.config.get("lines", []),
        zones=row.config.get("zones", []),
        status=row.status,
        desired=row.desired,
        reason=row.reason,
        stats=row.stats,
        counts=row.counts,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def job_out(row: JobRow) -> JobOut:
    return JobOut.model_validate(row, from_attributes=True)


def detection_out(row: DetectionRow) -> DetectionOut:
    return DetectionOut(
        id=row.id,
        stream_id=row.stream_id,
        job_id=row.job_id,
        track_id=row.track_id,
        start_seconds=row.start_seconds,
        end_seconds=row.end_seconds,
        started_at=row.started_at,
        ended_at=row.ended_at,
        keyframe_seconds=row.keyframe_seconds,
        keyframe_box=row.keyframe_box,
        frame_width=row.frame_width,
        frame_height=row.frame_height,
        boxes=row.boxes,
        keyframe_url=f"{API}/detections/{row.id}/keyframe.jpg",
        clip_url=f"{API}/detections/{row.id}/clip" if row.clip_name else None,
        created_at=row.created_at,
    )


def detection_event_data(row: DetectionRow) -> dict[str, Any]:
    out = detection_out(row)
    return {
        "detection_id": row.id,
        "stream_id": row.stream_id,
        "job_id": row.job_id,
        "track_id": row.track_id,
        "start_seconds": row.start_seconds,
        "end_seconds": row.end_seconds,
        "started_at": row.started_at.isoformat() if row.started_at else None,
        "ended_at": row.ended_at.isoformat() if row.ended_at else None,
        "frame_width": row.frame_width,
        "frame_height": row.frame_height,
        "boxes": [b.model_dump() for b in out.boxes],
        "snapshot_url": out.keyframe_url,
        "clip_url": out.clip_url,
    }


def _box(box: Box) -> list[float]:
    return [round(box.x, 1), round(box.y, 1), round(box.w, 1), round(box.h, 1)]


@dataclass(frozen=True)
class DetectionSource:
    """Where a detection came from: a stream (with its wall-clock origin) or a job."""

    stream_id: str | None = None
    job_id: str | None = None
    origin: datetime | None = None  # wall time of second 0, for live streams


class VideoService:
    def __init__(self, runtime: ServiceRuntime, settings: VideoSettings, store: MediaStore):
        self.runtime = runtime
        self.settings = settings
        self.store = store
        self.policy = url_policy(settings)

    # Streams

    async def checked_url(self, url: str) -> str:
        try:
            await check_url(url, self.policy)
        except UnsafeURL as exc:
            raise UnsafeSource(str(exc), url=url) from exc
        return url

    async def create_stream(self, session: AsyncSession, body: StreamIn) -> StreamRow:
        await self.checked_url(body.url)
        if await repository.count_streams(session) >= self.settings.max_streams:
            raise TooManyStreams(f"at most {self.settings.max_streams} streams (max_streams)")
        at = now()
        row = StreamRow(
            id=str(uuid.uuid4()),
            name=body.name,
            url=body.url,
            desired="running" if body.start else "stopped",
            status="starting" if body.start else "stopped",
            reason=None,
            config={
                "lines": [line.model_dump(mode="json") for line in body.lines],
                "zones": [zone.model_dump(mode="json") for zone in body.zones],
            },
            counts={},
            stats={},
            created_at=at,
            updated_at=at,
        )
        await repository.add(session, row)
        return row

    async def stream(self, session: AsyncSession, stream_id: str) -> StreamRow:
        row = await repository.get_stream(session, stream_id)
        if row is None:
            raise NotFound(f"no stream {stream_id}")
        return row

    async def patch_stream(
        self, session: AsyncSession, stream_id: str, body: StreamPatch
    ) -> StreamRow:
        row = await self.stream(session, stream_id)
        if body.url is not None:
            row.url = await self.checked_url(body.url)
            row.owner = None  # the worker of the old URL stops; a new one takes the new URL
        if body.name is not None:
            row.name = body.name
        config = dict(row.config)
        if body.lines is not None:
            config["lines"] = [line.model_dump(mode="json") for line in body.lines]
        if body.zones is not None:
            config["zones"] = [zone.model_dump(mode="json") for zone in body.zones]
        row.config = config
        row.updated_at = now()
        await session.flush()
        return row

    async def set_desired(self, session: AsyncSession, stream_id: str, desired: str) -> StreamRow:
        row = await self.stream(session, stream_id)
        row.desired = desired
        if desired == "running" and row.status in ("failed", "stopped"):
            row.status, row.reason = "starting", None
        row.updated_at = now()
        await session.flush()
        return row

    # Jobs

    async def create_job(
        self,
        session: AsyncSession,
        body: AsyncIterator[bytes],
        *,
        filename: str | None,
        content_type: str | None,
    ) -> JobRow:
        suffix = _suffix(filename)
        try:
            name, size = await self.store.save_stream(
                "uploads", body, suffix=suffix, max_bytes=self.settings.max_upload_bytes
            )
        except TooLarge as exc:
            raise UploadTooLarge(str(exc), limit_bytes=self.settings.max_upload_bytes) from exc
        if size == 0:
            self.store.delete("uploads", name)
            raise InvalidUpload("the body is empty: send the clip's bytes as the request body")
        row = JobRow(
            id=str(uuid.uuid4()),
            filename=filename,
            media_name=name,
            content_type=content_type,
            size_bytes=size,
            status="queued",
            reason=None,
            progress=0.0,
            frames_declared=None,
            frames_decoded=0,
            frames_analysed=0,
            duration_seconds=None,
            detections=0,
            classification=None,
            attempts=0,
            created_at=now(),
        )
        try:
            await repository.add(session, row)
        except BaseException:  # a failed or cancelled insert: no job will ever read the file
            self.store.delete("uploads", name)
            raise
        return row

    async def job(self, session: AsyncSession, job_id: str) -> JobRow:
        row = await repository.get_job(session, job_id)
        if row is None:
            raise NotFound(f"no job {job_id}")
        return row

    async def finish_job(
        self, session: AsyncSession, job: JobRow, status: str, reason: str | None, **values: Any
    ) -> None:
        detections = await repository.count_job_detections(session, job.id)
        classification = None
        if status == "succeeded":
            classification = "events" if detections else "empty"
        await repository.update_job(
            session,
            job.id,
            status=status,
            reason=reason,
            detections=detections,
            classification=classification,
            finished_at=now(),
            owner=None,
            lease_until=None,
            **values,
        )
        data = {
            "job_id": job.id,
            "status": status,
            "reason": reason,
            "classification": classification,
            "detections": detections,
            "filename": job.filename,
            **{k: v for k, v in values.items() if k != "progress"},
        }
        self.runtime.outbox.add(
            session, self.runtime.event("video.job.finished", data, subject=f"video/job/{job.id}")
        )
        JOBS.labels(status).inc()

    # Detections

    async def detection(self, session: AsyncSession, detection_id: str) -> DetectionRow:
        row = await repository.get_detection(session, detection_id)
        if row is None:
            raise NotFound(f"no detection {detection_id}")
        return row

    async def save_detection(
        self, session: AsyncSession, source: DetectionSource, event: DetectedEvent, keyframe: str
    ) -> DetectionRow | None:
        """Store a detection and its ``detection.created`` event; None when a resumed job
        found it already stored (same first frame and track)."""
        key = f"{event.start_frame}:{event.track_id}"
        if source.job_id and await repository.job_detection_exists(session, source.job_id, key):
            return None
        width, height = event.frame_size
        row = DetectionRow(
            id=str(uuid.uuid4()),
            stream_id=source.stream_id,
            job_id=source.job_id,
            source_key=key,
            track_id=event.track_id,
            start_seconds=round(event.start, 3),
            end_seconds=round(event.end, 3),
            started_at=source.origin + timedelta(seconds=event.start) if source.origin else None,
            ended_at=source.origin + timedelta(seconds=event.end) if source.origin else None,
            boxes=[
                {
                    "t": round(o.t, 3),
                    "frame": o.frame,
                    **dict(zip("xywh", _box(o.box), strict=True)),
                }
                for o in event.boxes
            ],
            keyframe_box=_box(event.keyframe_box),
            keyframe_seconds=round(event.keyframe_time, 3),
            keyframe_name=keyframe,
            clip_name=event.clip_path.name if event.clip_path else None,
            frame_width=width,
            frame_height=height,
            created_at=now(),
        )
        await repository.add(session, row)
        subject = (
            f"video/stream/{source.stream_id}" if source.stream_id else f"video/job/{source.job_id}"
        )
        self.runtime.outbox.add(
            session,
            self.runtime.event("detection.created", detection_event_data(row), subject=subject),
        )
        DETECTIONS.labels(source.stream_id or "jobs").inc()
        return row


def _suffix(filename: str | None) -> str:
    if filename and "." in filename:
        ext = filename.rsplit(".", 1)[1].lower()
        if ext.isalnum() and len(ext) <= 5:
            return f".{ext}"
    return ".video"
