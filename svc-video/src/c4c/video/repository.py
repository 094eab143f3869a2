"""Every query of the video service."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Select, and_, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from c4c.shared.db import union_of_limited
from c4c.video.models import DetectionRow, JobRow, StreamRow

# Streams


async def add(session: AsyncSession, row: StreamRow | JobRow | DetectionRow) -> None:
    session.add(row)
    await session.flush()


async def get_stream(session: AsyncSession, stream_id: str) -> StreamRow | None:
    return await session.get(StreamRow, stream_id)


async def list_streams(session: AsyncSession, *, limit: int, offset: int) -> list[StreamRow]:
    query = select(StreamRow).order_by(StreamRow.created_at, StreamRow.id)
    return list((await session.scalars(query.limit(limit).offset(offset))).all())


async def count_streams(session: AsyncSession) -> int:
    return int(await session.scalar(select(func.count()).select_from(StreamRow)) or 0)


async def delete_stream(session: AsyncSession, stream_id: str) -> bool:
    result = await session.execute(delete(StreamRow).where(StreamRow.id == stream_id))
    return bool(getattr(result, "rowcount", 0))


async def claim_streams(
    session: AsyncSession, owner: str, now: datetime, lease_until: datetime
) -> list[StreamRow]:
    """Take every stream that should run and that no live worker holds; renew our own."""
    wanted = StreamRow.desired.in_(("running", "paused"))
    free = or_(StreamRow.owner.is_(None), StreamRow.owner == owner, StreamRow.lease_until < now)
    await session.execute(
        update(StreamRow).where(wanted, free).values(owner=owner, lease_until=lease_until)
    )
    mine = select(StreamRow).where(StreamRow.owner == owner)
    return list((await session.scalars(mine)).all())


async def update_stream(session: AsyncSession, stream_id: str, **values: Any) -> None:
    await session.execute(update(StreamRow).where(StreamRow.id == stream_id).values(**values))


async def release_streams(session: AsyncSession, owner: str, ids: Sequence[str]) -> None:
    await session.execute(
        update(StreamRow)
        .where(StreamRow.owner == owner, StreamRow.id.in_(list(ids)))
        .values(owner=None, lease_until=None)
    )


# Jobs


async def get_job(session: AsyncSession, job_id: str) -> JobRow | None:
    return await session.get(JobRow, job_id)


async def list_jobs(
    session: AsyncSession, *, status: str | None, limit: int, offset: int
) -> list[JobRow]:
    query = select(JobRow).order_by(JobRow.created_at.desc(), JobRow.id)
    if status:
        query = query.where(JobRow.status == status)
    return list((await session.scalars(query.limit(limit).offset(offset))).all())


def _claimable(now: datetime) -> Any:
    return or_(
        JobRow.status == "queued",
        and_(JobRow.status == "running", JobRow.lease_until < now),
    )


def oldest_claimable(now: datetime) -> Select[tuple[str]]:
    """The oldest queued job and the oldest one whose worker died, each found along the
    status index, then the older of the two: one condition with OR walked the jobs in age
    order, finished ones included, until it met a claimable one."""
    arms = [
        select(JobRow.id, JobRow.created_at).where(*condition).order_by(JobRow.created_at).limit(1)
        for condition in (
            (JobRow.status == "queued",),
            (JobRow.status == "running", JobRow.lease_until < now),
        )
    ]
    both = union_of_limited(arms).subquery()
    return select(both.c.id).order_by(both.c.created_at).limit(1)


async def abandoned_jobs(session: AsyncSession, now: datetime, max_attempts: int) -> list[JobRow]:
    """Running jobs whose worker went silent and that were started too often already."""
    query = select(JobRow).where(
        JobRow.status == "running", JobRow.lease_until < now, JobRow.attempts >= max_attempts
    )
    return list((await session.scalars(query)).all())


async def claim_job(
    session: AsyncSession, owner: str, now: datetime, lease_until: datetime
) -> JobRow | None:
    """The oldest queued job (or one whose worker died), now ours; None when there is none.
    The condition is checked again in the UPDATE, so two replicas never take the same job."""
    candidate = await session.scalar(oldest_claimable(now))
    if candidate is None:
        return None
    result = await session.execute(
        update(JobRow)
        .where(JobRow.id == candidate, _claimable(now))
        .values(
            status="running",
            owner=owner,
            lease_until=lease_until,
            attempts=JobRow.attempts + 1,
            started_at=now,
        )
    )
    if not getattr(result, "rowcount", 0):
        return None
    return await session.get(JobRow, candidate, populate_existing=True)


async def update_job(session: AsyncSession, job_id: str, **values: Any) -> None:
    await session.execute(update(JobRow).where(JobRow.id == job_id).values(**values))


async def count_job_detections(session: AsyncSession, job_id: str) -> int:
    query = select(func.count()).select_from(DetectionRow).where(DetectionRow.job_id == job_id)
    return int(await session.scalar(query) or 0)


# Detections


async def get_detection(session: AsyncSession, detection_id: str) -> DetectionRow | None:
    return await session.get(DetectionRow, detection_id)


async def job_detection_exists(session: AsyncSession, job_id: str, source_key: str) -> bool:
    query = select(DetectionRow.id).where(
        DetectionRow.job_id == job_id, DetectionRow.source_key == source_key
    )
    return await session.scalar(query) is not None


async def list_detections(
    session: AsyncSession,
    *,
    stream_id: str | None,
    job_id: str | None,
    since: datetime | None,
    until: datetime | None,
    min_seconds: float | None,
    limit: int,
    offset: int,
) -> list[DetectionRow]:
    query = select(DetectionRow).order_by(DetectionRow.created_at, DetectionRow.id)
    if stream_id:
        query = query.where(DetectionRow.stream_id == stream_id)
    if job_id:
        query = query.where(DetectionRow.job_id == job_id)
    if since:
        query = query.where(DetectionRow.created_at >= since)
    if until:
        query = query.where(DetectionRow.created_at < until)
    if min_seconds is not None:
        query = query.where(DetectionRow.end_seconds - DetectionRow.start_seconds >= min_seconds)
    return list((await session.scalars(query.limit(limit).offset(offset))).all())
