"""Builds the video service's app."""

from fastapi import FastAPI

from c4c.shared.app import create_service_app
from c4c.shared.bus import EventBus
from c4c.video.api import JSON_LIMIT, router
from c4c.video.service import VideoService
from c4c.video.settings import VideoSettings
from c4c.video.storage import MediaStore
from c4c.video.workers import Workers

PREFIXES = ("/video",)


def create_app(settings: VideoSettings | None = None, bus: EventBus | None = None) -> FastAPI:
    settings = settings or VideoSettings()
    app = create_service_app(
        settings,
        title="Video stream processing",
        description="Camera streams and clips turned into detections, keyframes and clips.",
        version="0.1.0",
        prefixes=PREFIXES,
        routers=[router],
        bus=bus,
        migrations=["c4c.video:migrations"],
        body_limits={
            f"{router.prefix}/jobs": settings.max_upload_bytes,
            f"{router.prefix}/streams": JSON_LIMIT,  # a 413 problem, where FastAPI's is text
        },
    )
    runtime = app.state.runtime
    service = VideoService(runtime, settings, MediaStore(settings.resolved_media_dir / "video"))
    workers = Workers(runtime, service)
    app.state.video = service
    app.state.video_workers = workers

    runtime.add_background(workers.start, workers.stop)
    return app
