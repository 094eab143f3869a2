"""Builds the plantid service's app."""

from fastapi import FastAPI

from c4c.plantid.api import router
from c4c.plantid.settings import PlantidSettings
from c4c.shared.app import create_service_app
from c4c.shared.bus import EventBus

PREFIXES = (
    "/plantid",
    "/v2",
)


def create_app(settings: PlantidSettings | None = None, bus: EventBus | None = None) -> FastAPI:
    return create_service_app(
        settings or PlantidSettings(),
        title="Plant identification",
        description="Pl@ntNet-compatible plant identification over an observatory's own flora.",
        version="0.1.0",
        prefixes=PREFIXES,
        routers=[router],
        bus=bus,
    )
