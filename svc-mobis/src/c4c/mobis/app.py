"""Builds the mobis service's app."""

from fastapi import FastAPI

from c4c.mobis.api import JWKS_PATH, PREFIX, build_router
from c4c.mobis.consumers import consumers
from c4c.mobis.remote import Ingest, PlantId
from c4c.mobis.settings import MobisSettings
from c4c.mobis.wiring import Parts
from c4c.shared.app import create_service_app
from c4c.shared.bus import EventBus

PREFIXES = ("/mobis",)
MIGRATIONS = ["c4c.mobis:migrations"]
CHUNK_OVERHEAD = 64 * 1024


def create_app(
    settings: MobisSettings | None = None,
    bus: EventBus | None = None,
    *,
    ingest: Ingest | None = None,
    plantid: PlantId | None = None,
) -> FastAPI:
    """``ingest`` and ``plantid`` replace the HTTP ports (tests); by default the other
    services are reached through ``runtime.clients``."""
    settings = settings or MobisSettings()
    app = create_service_app(
        settings,
        title="MOBIS mobile app backend",
        description=(
            "Accounts, app configuration, offline-first sync, resumable media, my "
            "observations and live notifications for mobile observatory apps."
        ),
        version="0.1.0",
        prefixes=PREFIXES,
        routers=[build_router(settings)],
        bus=bus,
        migrations=MIGRATIONS,
        consumers=consumers(lambda: app.state.parts),
        body_limits={
            f"{PREFIX}/media": settings.media_chunk_max_bytes + CHUNK_OVERHEAD,
            f"{PREFIX}/identify": settings.identify_max_bytes + CHUNK_OVERHEAD,
        },
        # The gateway fetches it without a principal, and anyone may check a token.
        public_paths=[JWKS_PATH],
    )
    app.state.parts = Parts(app.state.runtime, settings, ingest=ingest, plantid=plantid)
    return app
