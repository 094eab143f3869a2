"""Builds the quality service's app."""

from fastapi import FastAPI

from c4c.quality.api import router
from c4c.quality.settings import QualitySettings
from c4c.shared.app import create_service_app
from c4c.shared.bus import EventBus

PREFIXES = ("/quality",)


def create_app(settings: QualitySettings | None = None, bus: EventBus | None = None) -> FastAPI:
    return create_service_app(
        settings or QualitySettings(),
        title="Data-quality scoring",
        description="An explainable quality score, grade and flags for every observation.",
        version="0.1.0",
        prefixes=PREFIXES,
        routers=[router],
        bus=bus,
    )
