"""Builds the mobis service's app."""

from fastapi import FastAPI

from c4c.mobis.api import router
from c4c.mobis.settings import MobisSettings
from c4c.shared.app import create_service_app
from c4c.shared.bus import EventBus

PREFIXES = ("/mobis",)


def create_app(settings: MobisSettings | None = None, bus: EventBus | None = None) -> FastAPI:
    return create_service_app(
        settings or MobisSettings(),
        title="MOBIS mobile app backend",
        description=(
            "Accounts, app configuration and offline-first sync for mobile observatory apps."
        ),
        version="0.1.0",
        prefixes=PREFIXES,
        routers=[router],
        bus=bus,
    )
