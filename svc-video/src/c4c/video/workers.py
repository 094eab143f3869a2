"""Background work of the video service: clip jobs and live streams. The work runs in
threads; its state lives in the database (job and stream records with a lease), so a crash
or restart resumes it and nothing waits on an unacknowledged broker message.

- Jobs: a runner claims the oldest queued job (or one whose lease ran out: its worker
  died), analyses it in a thread, renews the lease with every progress report, and ends
  with ``video.job.finished``. A job started ``job_max_attempts`` times is failed.
- Streams: a supervisor claims the streams that should run, starts a worker per stream,
  applies start/stop/pause, and writes status, counters and stats back every tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import uuid
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any, TypeVar

import cv2

from c4c.shared.app import ServiceRuntime
from c4c.shared.urls import UnsafeURL, check_url
from c4c.video import repository
from c4c.video.analysis.pictures import Picture
from c4c.video.analysis.pipeline import DetectedEvent
from c4c.video.analysis.sources import (
    Backoff,
    Cancelled,
    Capture,
    ClosedCapture,
    StreamWorker,
    VideoUnreadable,
    analyse_file,
    open_capture,
)
from c4c.video.metrics import PrometheusObserver
from c4c.video.models import JobRow, StreamRow
from c4c.video.service import (
    DetectionSource,
    VideoService,
    analysis_params,
    counters_of,
    now,
)

log = logging.getLogger("c4c.video.workers")

T = TypeVar("T")


class _Bridge:
    """Runs coroutines on the service's loop from worker threads, and waits for them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)


class Workers:
    def __init__(self, runtime: ServiceRuntime, service: VideoService) -> None:
        self.runtime = runtime
        self.service = service
        self.settings = service.settings
        self.owner = f"video-{uuid.uuid4().hex[:12]}"
        self.streams: dict[str, StreamWorker] = {}
        self._wake_jobs = asyncio.Event()
        self._wake_streams = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._cancel = threading.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._stopping = False

    async def start(self) -> None:
        self.service.store.ensure()
        self._stopping = False
        self._cancel.clear()
        self._executor = ThreadPoolExecutor(self.settings.job_workers, thread_name_prefix="job")
        bridge = _Bridge(asyncio.get_running_loop())
        self._tasks = [
            asyncio.create_task(self._job_loop(bridge), name=f"video-jobs-{i}")
            for i in range(self.settings.job_workers)
        ]
        self._tasks.append(asyncio.create_task(self._stream_loop(bridge), name="video-streams"))

    async def stop(self) -> None:
        self._stopping = True
        self._cancel.set()  # running jobs stop at their next frame and go back to the queue
        self.wake()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        workers, self.streams = self.streams, {}
        await asyncio.gather(*(asyncio.to_thread(w.stop) for w in workers.values()))
        async with self.runtime.db.sessions() as session, session.begin():
            for stream_id, worker in workers.items():
                await repository.update_stream(
                    session, stream_id, stats=_stats(worker), counts=worker.counters.summary()
                )
            await repository.release_streams(session, self.owner, list(workers))
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def wake(self) -> None:
        self._wake_jobs.set()
        self._wake_streams.set()

    async def _sleep(self, event: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), seconds)
        event.clear()

    # Jobs

    async def _job_loop(self, bridge: _Bridge) -> None:
        while not self._stopping:
            try:
                job = await self._claim()
            except Exception:
                log.exception("could not claim a job")
                job = None
            if job is None:
                await self._sleep(self._wake_jobs, self.settings.job_lease_seconds / 4)
                continue
            await self._run_job(job, bridge)

    async def _claim(self) -> JobRow | None:
        lease = timedelta(seconds=self.settings.job_lease_seconds)
        async with self.runtime.db.sessions() as session, session.begin():
            at = now()
            for job in await repository.abandoned_jobs(session, at, self.settings.job_max_attempts):
                reason = f"interrupted {job.attempts} times (worker stopped or crashed)"
                await self.service.finish_job(session, job, "failed", reason)
            return await repository.claim_job(session, self.owner, at, at + lease)

    async def _run_job(self, job: JobRow, bridge: _Bridge) -> None:
        store = self.service.store
        source = DetectionSource(job_id=job.id)
        lease = timedelta(seconds=self.settings.job_lease_seconds)

        async def progress(decoded: int, declared: int) -> None:
            async with self.runtime.db.sessions() as session, session.begin():
                await repository.update_job(
                    session,
                    job.id,
                    frames_decoded=decoded,
                    frames_declared=declared or None,
                    progress=min(1.0, decoded / declared) if declared else 0.0,
                    lease_until=now() + lease,
                )

        def sink(event: DetectedEvent) -> None:
            bridge.call(self._store_detection(source, event))

        def work() -> Any:
            return analyse_file(
                store.path("uploads", job.media_name),
                analysis_params(self.settings),
                sink=sink,
                clip_dir=store.clip_dir,
                progress=lambda d, t: bridge.call(progress(d, t)),
                cancelled=self._cancel,
                observer=PrometheusObserver("jobs"),
                policy=self.service.policy,
            )

        loop = asyncio.get_running_loop()
        try:
            summary = await loop.run_in_executor(self._executor, work)
        except Cancelled:  # the service is stopping: back to the queue, resumed at next start
            async with self.runtime.db.sessions() as session, session.begin():
                await repository.update_job(
                    session, job.id, status="queued", owner=None, lease_until=None
                )
            return
        except VideoUnreadable as exc:
            await self._finish(job, "failed", str(exc))
            return
        except Exception as exc:
            log.exception("job crashed", extra={"job": job.id})
            await self._finish(job, "failed", f"internal error: {type(exc).__name__}")
            return
        await self._finish(
            job,
            "succeeded",
            None,
            progress=1.0,
            frames_declared=summary.frames_declared or None,
            frames_decoded=summary.frames_decoded,
            frames_analysed=summary.frames_analysed,
            duration_seconds=round(summary.duration, 3),
        )

    async def _finish(self, job: JobRow, status: str, reason: str | None, **values: Any) -> None:
        async with self.runtime.db.sessions() as session, session.begin():
            await self.service.finish_job(session, job, status, reason, **values)

    async def _store_detection(self, source: DetectionSource, event: DetectedEvent) -> None:
        store = self.service.store
        keyframe = await asyncio.to_thread(
            store.write_bytes, "keyframes", event.keyframe_jpeg, suffix=".jpg"
        )
        async with self.runtime.db.sessions() as session, session.begin():
            row = await self.service.save_detection(session, source, event, keyframe)
        if row is None:  # already stored by an earlier run of this job
            store.delete("keyframes", keyframe)

    # Streams

    async def _stream_loop(self, bridge: _Bridge) -> None:
        while not self._stopping:
            try:
                await self._supervise(bridge)
            except Exception:
                log.exception("stream supervision failed")
            await self._sleep(self._wake_streams, 1.0)

    async def _supervise(self, bridge: _Bridge) -> None:
        lease = timedelta(seconds=max(10.0, self.settings.job_lease_seconds / 2))
        async with self.runtime.db.sessions() as session, session.begin():
            at = now()
            mine = {
                row.id: row
                for row in await repository.claim_streams(session, self.owner, at, at + lease)
            }
            gone = [
                sid for sid in self.streams if sid not in mine or mine[sid].desired == "stopped"
            ]
            changed_url = [
                sid
                for sid, row in mine.items()
                if sid in self.streams and self.streams[sid].url != row.url
            ]
        for stream_id in {*gone, *changed_url}:
            worker = self.streams.pop(stream_id)
            await asyncio.to_thread(worker.stop)
            async with self.runtime.db.sessions() as session, session.begin():
                if stream_id in mine:
                    values: dict[str, Any] = {
                        "stats": _stats(worker),
                        "counts": worker.counters.summary(),
                    }
                    if mine[stream_id].desired == "stopped":
                        values.update(status="stopped", reason=None, owner=None, lease_until=None)
                    await repository.update_stream(session, stream_id, **values)
        for stream_id, row in mine.items():
            if row.desired == "stopped":
                continue
            running = self.streams.get(stream_id)
            if running is None:
                self.streams[stream_id] = self._start_stream(row, bridge)
            else:
                running.pause(row.desired == "paused")
        async with self.runtime.db.sessions() as session, session.begin():
            for stream_id, worker in list(self.streams.items()):
                await repository.update_stream(
                    session,
                    stream_id,
                    stats=_stats(worker),
                    counts=worker.counters.summary(),
                    updated_at=now(),
                )
                if not worker.alive and worker.status == "failed":
                    self.streams.pop(stream_id)
                    await repository.update_stream(session, stream_id, desired="stopped")

    def _start_stream(self, row: StreamRow, bridge: _Bridge) -> StreamWorker:
        source = DetectionSource(stream_id=row.id, origin=now())
        policy = self.service.policy
        settings = self.settings
        stream_id = row.id

        def status(state: str, reason: str | None) -> None:
            bridge.call(self._set_status(stream_id, state, reason))

        def sink(event: DetectedEvent) -> None:
            bridge.call(self._store_detection(source, event))

        def opener(url: str) -> Capture:
            # DNS answers and redirects may have changed since the stream was registered.
            try:
                target = bridge.call(check_url(url, policy), timeout=settings.open_timeout * 2)
            except UnsafeURL as exc:
                log.warning("stream URL refused", extra={"stream": stream_id, "reason": str(exc)})
                return ClosedCapture(str(exc))
            return open_capture(target, settings.open_timeout, settings.read_timeout, policy)

        worker = StreamWorker(
            row.id,
            row.url,
            analysis_params(settings),
            sink=sink,
            clip_dir=self.service.store.clip_dir,
            on_status=status,
            counters=counters_of(row.config),
            backoff=Backoff(
                settings.reconnect_initial_delay,
                settings.reconnect_max_delay,
                settings.reconnect_max_attempts,
            ),
            observer=PrometheusObserver(row.id),
            opener=opener,
            paused=row.desired == "paused",
        )
        worker.start()
        return worker

    async def _set_status(self, stream_id: str, status: str, reason: str | None) -> None:
        async with self.runtime.db.sessions() as session, session.begin():
            await repository.update_stream(
                session, stream_id, status=status, reason=reason, updated_at=now()
            )
        self._wake_streams.set()

    async def snapshot(self, stream_id: str) -> bytes | None:
        worker = self.streams.get(stream_id)
        frame = worker.latest if worker is not None else None
        if frame is None:
            return None
        return await asyncio.to_thread(_jpeg, frame)


def _jpeg(picture: Picture) -> bytes:
    ok, data = cv2.imencode(".jpg", picture.colour(), [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:  # pragma: no cover - any uint8 BGR frame encodes
        raise RuntimeError("could not encode a snapshot")
    return bytes(data.tobytes())


def _stats(worker: StreamWorker) -> dict[str, Any]:
    s = worker.stats
    return {
        "frames_decoded": s.decoded,
        "frames_analysed": s.analysed,
        "frames_skipped": s.skipped,
        "frames_dropped_late": s.dropped_late,
        "reconnects": s.reconnects,
        "lag_seconds": round(s.lag, 3),
        "analysis_fps": round(s.analysis_fps, 2),
    }
