"""Builds the ingest service's app."""

from fastapi import FastAPI

from c4c.ingest.api import MEDIA_OVERHEAD, build_router
from c4c.ingest.consumers import consumers
from c4c.ingest.service import MediaUploads
from c4c.ingest.settings import IngestSettings
from c4c.ingest.wiring import Creations, Parts
from c4c.shared.app import create_service_app
from c4c.shared.bus import EventBus
from c4c.shared.storage import LocalDiskStorage

PREFIXES = ("/ingest",)
MIGRATIONS = ["c4c.ingest:migrations"]


def create_app(settings: IngestSettings | None = None, bus: EventBus | None = None) -> FastAPI:
    settings = settings or IngestSettings()
    storage = LocalDiskStorage(settings.resolved_media_dir)
    # Media bodies may exceed the suite-wide cap; every JSON route keeps it (per route).
    media_limit = max(settings.max_body_bytes, settings.media_max_bytes + MEDIA_OVERHEAD)
    app = create_service_app(
        settings,
        title="Observation ingestion",
        description=(
            "Citizen observations with media: idempotent, queryable, exportable, never lost."
        ),
        version="0.1.0",
        prefixes=PREFIXES,
        routers=[build_router(settings)],
        bus=bus,
        migrations=MIGRATIONS,
        consumers=consumers(settings, storage),
        body_limits={"/ingest/v1/observations": media_limit},
    )
    app.state.parts = parts = Parts(app.state.runtime, settings, storage)
    app.state.creations = Creations(parts, max_items=settings.batch_max_items)
    app.state.uploads = MediaUploads(parts.unit, parts.reading, storage, settings)
    return app
