"""Builds the video service's app."""

from fastapi import FastAPI

from c4c.shared.app import create_service_app
from c4c.shared.bus import EventBus
from c4c.video.api import router
from c4c.video.settings import VideoSettings

PREFIXES = ("/video",)


def create_app(settings: VideoSettings | None = None, bus: EventBus | None = None) -> FastAPI:
    return create_service_app(
        settings or VideoSettings(),
        title="Video stream processing",
        description="Camera streams and clips turned into detections, keyframes and clips.",
        version="0.1.0",
        prefixes=PREFIXES,
        routers=[router],
        bus=bus,
    )
