"""Builds the plantid service's app."""

from __future__ import annotations

from fastapi import FastAPI

from c4c.plantid.api import (
    VERSION,
    PlantNetFailure,
    on_plantnet_failure,
    plantnet,
    plantnet_refusal,
    router,
)
from c4c.plantid.consumers import plantid_consumers
from c4c.plantid.service import Engine, Fetch, Identifier, ImportRunner
from c4c.plantid.settings import PlantidSettings
from c4c.shared.app import ServiceRuntime, create_service_app
from c4c.shared.bus import EventBus
from c4c.shared.storage import LocalDiskStorage

PREFIXES = (
    "/plantid",
    "/v2",
)


def create_app(settings: PlantidSettings | None = None, bus: EventBus | None = None) -> FastAPI:
    settings = settings or PlantidSettings()
    engine = Engine(settings, LocalDiskStorage(settings.resolved_media_dir / "plantid"))

    def photo_fetcher(runtime: ServiceRuntime) -> Fetch:
        """Photos an observation or an import points at: the suite's own media straight from
        the owning service (with this service's credential), other URLs only when public."""

        async def fetch(url: str) -> bytes:
            return await runtime.clients.fetch(url, max_bytes=settings.identify_max_bytes)

        return fetch

    def consumers(runtime: ServiceRuntime) -> dict[str, object]:
        return dict(plantid_consumers(runtime, engine, settings, photo_fetcher(runtime)))

    app = create_service_app(
        settings,
        title="Plant identification",
        description="Pl@ntNet-compatible plant identification over an observatory's own flora.",
        version=VERSION,
        prefixes=PREFIXES,
        routers=[plantnet, router],  # /v2/identify first: routes are matched in order
        bus=bus,
        migrations=["c4c.plantid:migrations"],
        consumers=consumers,  # type: ignore[arg-type]
        body_limits={
            "/v2/identify": settings.identify_max_bytes,
            "/plantid/v1/projects": settings.identify_max_bytes,
        },
        refusal_shapes={"/v2": plantnet_refusal},
    )
    runtime: ServiceRuntime = app.state.runtime
    app.add_exception_handler(PlantNetFailure, on_plantnet_failure)
    app.state.plantid_engine = engine
    identifier = Identifier(runtime.db.sessions, engine, settings)
    app.state.plantid_identifier = identifier
    imports = ImportRunner(runtime.db.sessions, engine, settings, photo_fetcher(runtime))
    app.state.plantid_imports = imports
    # Interrupted imports resume once the service is up; the engine closes only after the
    # bus drained, since the consumer uses it.
    runtime.add_background(imports.resume)  # imports are jobs in the database
    runtime.add_closer(engine.close)
    runtime.add_closer(identifier.ledger.close)  # runs first: closers run in reverse
    return app
