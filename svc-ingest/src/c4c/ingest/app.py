"""Builds the ingest service's app."""

from fastapi import FastAPI

from c4c.ingest.api import router
from c4c.ingest.settings import IngestSettings
from c4c.shared.app import create_service_app
from c4c.shared.bus import EventBus

PREFIXES = ("/ingest",)


def create_app(settings: IngestSettings | None = None, bus: EventBus | None = None) -> FastAPI:
    return create_service_app(
        settings or IngestSettings(),
        title="Observation ingestion",
        description=(
            "Citizen observations with media: idempotent, queryable, exportable, never lost."
        ),
        version="0.1.0",
        prefixes=PREFIXES,
        routers=[router],
        bus=bus,
    )
