"""HTTP routes of the video service (thin: they call ``service``)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Query, Request, Response

from c4c.shared.db import SessionDep
from c4c.shared.problems import NotFound
from c4c.shared.responses import FileResponse
from c4c.video import repository
from c4c.video.analysis.pipeline import CLIP_CONTENT_TYPE
from c4c.video.schemas import (
    DetectionList,
    DetectionOut,
    JobList,
    JobOut,
    StreamIn,
    StreamList,
    StreamOut,
    StreamPatch,
    StreamStatus,
)
from c4c.video.service import (
    InvalidUpload,
    NoSnapshot,
    VideoService,
    detection_out,
    job_out,
    stream_out,
)
from c4c.video.workers import Workers

router = APIRouter(prefix="/video/v1", tags=["video"])

JSON_LIMIT = 256 * 1024
Limit = Annotated[int, Query(ge=1, le=500)]
Offset = Annotated[int, Query(ge=0, le=1_000_000)]


def _service(request: Request) -> VideoService:
    service: VideoService = request.app.state.video
    return service


def _workers(request: Request) -> Workers:
    workers: Workers = request.app.state.video_workers
    return workers


# Streams


@router.post("/streams", status_code=201, response_model=StreamOut)
async def create_stream(
    body: StreamIn,
    session: SessionDep,
    request: Request,
    response: Response,
    background: BackgroundTasks,
) -> StreamOut:
    row = await _service(request).create_stream(session, body)
    response.headers["Location"] = f"{router.prefix}/streams/{row.id}"
    background.add_task(_workers(request).wake)  # once committed
    return stream_out(row)


@router.get("/streams", response_model=StreamList)
async def list_streams(session: SessionDep, limit: Limit = 50, offset: Offset = 0) -> StreamList:
    rows = await repository.list_streams(session, limit=limit, offset=offset)
    return StreamList(items=[stream_out(r) for r in rows], limit=limit, offset=offset)


@router.get("/streams/{stream_id}", response_model=StreamOut)
async def get_stream(stream_id: str, session: SessionDep, request: Request) -> StreamOut:
    return stream_out(await _service(request).stream(session, stream_id))


@router.patch("/streams/{stream_id}", response_model=StreamOut)
async def patch_stream(
    stream_id: str, body: StreamPatch, session: SessionDep, request: Request
) -> StreamOut:
    row = await _service(request).patch_stream(session, stream_id, body)
    return stream_out(row)


@router.delete("/streams/{stream_id}", status_code=204)
async def delete_stream(
    stream_id: str, session: SessionDep, request: Request, background: BackgroundTasks
) -> Response:
    background.add_task(_workers(request).wake)
    if not await repository.delete_stream(session, stream_id):
        raise NotFound(f"no stream {stream_id}")
    return Response(status_code=204)


@router.get("/streams/{stream_id}/status", response_model=StreamStatus)
async def stream_status(stream_id: str, session: SessionDep, request: Request) -> StreamStatus:
    row = await _service(request).stream(session, stream_id)
    return StreamStatus.model_validate(stream_out(row).model_dump())


async def _desire(request: Request, session: SessionDep, stream_id: str, desired: str) -> StreamOut:
    row = await _service(request).set_desired(session, stream_id, desired)
    return stream_out(row)


@router.post("/streams/{stream_id}/start", status_code=202, response_model=StreamOut)
async def start_stream(
    stream_id: str, session: SessionDep, request: Request, background: BackgroundTasks
) -> StreamOut:
    background.add_task(_workers(request).wake)
    return await _desire(request, session, stream_id, "running")


@router.post("/streams/{stream_id}/stop", status_code=202, response_model=StreamOut)
async def stop_stream(
    stream_id: str, session: SessionDep, request: Request, background: BackgroundTasks
) -> StreamOut:
    background.add_task(_workers(request).wake)
    return await _desire(request, session, stream_id, "stopped")


@router.post("/streams/{stream_id}/pause", status_code=202, response_model=StreamOut)
async def pause_stream(
    stream_id: str, session: SessionDep, request: Request, background: BackgroundTasks
) -> StreamOut:
    background.add_task(_workers(request).wake)
    return await _desire(request, session, stream_id, "paused")


@router.get(
    "/streams/{stream_id}/snapshot.jpg",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}}},
)
async def stream_snapshot(stream_id: str, session: SessionDep, request: Request) -> Response:
    await _service(request).stream(session, stream_id)
    jpeg = await _workers(request).snapshot(stream_id)
    if jpeg is None:
        raise NoSnapshot("the stream has not delivered a frame to this service yet")
    return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "no-store"})


# Jobs


@router.post("/jobs", status_code=202, response_model=JobOut)
async def create_job(
    request: Request,
    session: SessionDep,
    response: Response,
    background: BackgroundTasks,
    filename: Annotated[str | None, Query(max_length=300)] = None,
) -> JobOut:
    """Upload a clip as the raw request body (``Content-Type: video/...``); it is analysed
    in the background. Poll ``GET /jobs/{id}`` for progress."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(("multipart/", "application/json", "application/x-www-form")):
        raise InvalidUpload(
            f"send the clip's bytes as the body (e.g. Content-Type: video/mp4), not {content_type}"
        )
    row = await _service(request).create_job(
        session, request.stream(), filename=filename, content_type=content_type or None
    )
    response.headers["Location"] = f"{router.prefix}/jobs/{row.id}"
    background.add_task(_workers(request).wake)  # once committed
    return job_out(row)


@router.get("/jobs", response_model=JobList)
async def list_jobs(
    session: SessionDep,
    status: Annotated[str | None, Query(pattern="^(queued|running|succeeded|failed)$")] = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> JobList:
    rows = await repository.list_jobs(session, status=status, limit=limit, offset=offset)
    return JobList(items=[job_out(r) for r in rows], limit=limit, offset=offset)


@router.get("/jobs/{job_id}", response_model=JobOut)
async def get_job(job_id: str, session: SessionDep, request: Request) -> JobOut:
    return job_out(await _service(request).job(session, job_id))


# Detections


@router.get("/detections", response_model=DetectionList)
async def list_detections(
    session: SessionDep,
    stream_id: str | None = None,
    job_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    min_seconds: Annotated[float | None, Query(ge=0)] = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> DetectionList:
    rows = await repository.list_detections(
        session,
        stream_id=stream_id,
        job_id=job_id,
        since=since,
        until=until,
        min_seconds=min_seconds,
        limit=limit,
        offset=offset,
    )
    return DetectionList(items=[detection_out(r) for r in rows], limit=limit, offset=offset)


@router.get("/detections/{detection_id}", response_model=DetectionOut)
async def get_detection(detection_id: str, session: SessionDep, request: Request) -> DetectionOut:
    return detection_out(await _service(request).detection(session, detection_id))


@router.get(
    "/detections/{detection_id}/keyframe.jpg",
    response_class=FileResponse,
    responses={200: {"content": {"image/jpeg": {}}}},
)
async def detection_keyframe(
    detection_id: str, session: SessionDep, request: Request
) -> FileResponse:
    service = _service(request)
    row = await service.detection(session, detection_id)
    path = service.store.path("keyframes", row.keyframe_name)
    if not path.is_file():
        raise NotFound("the keyframe file is missing")
    return FileResponse(path, media_type="image/jpeg")


@router.get(
    "/detections/{detection_id}/clip",
    response_class=FileResponse,
    responses={200: {"content": {CLIP_CONTENT_TYPE: {}}}},
)
async def detection_clip(detection_id: str, session: SessionDep, request: Request) -> FileResponse:
    service = _service(request)
    row = await service.detection(session, detection_id)
    if row.clip_name is None:
        raise NotFound("this detection has no clip")
    path = service.store.path("clips", row.clip_name)
    if not path.is_file():
        raise NotFound("the clip file is missing")
    # Inline: a browser plays it where it is opened; FileResponse answers Range requests, so
    # a <video> element can seek.
    return FileResponse(
        path,
        media_type=CLIP_CONTENT_TYPE,
        filename=f"detection-{row.id}.mp4",
        content_disposition_type="inline",
    )
