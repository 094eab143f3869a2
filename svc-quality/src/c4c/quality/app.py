"""Builds the quality service's app."""

import asyncio
import contextlib

from fastapi import FastAPI

from c4c.quality.api import build_router
from c4c.quality.consumers import consumers
from c4c.quality.settings import QualitySettings
from c4c.quality.wiring import Parts
from c4c.shared.app import ServiceRuntime, create_service_app
from c4c.shared.bus import EventBus

PREFIXES = ("/quality",)
MIGRATIONS = ["c4c.quality:migrations"]


def create_app(settings: QualitySettings | None = None, bus: EventBus | None = None) -> FastAPI:
    settings = settings or QualitySettings()
    made: dict[int, Parts] = {}

    def parts_of(runtime: ServiceRuntime) -> Parts:
        if id(runtime) not in made:
            made[id(runtime)] = Parts(runtime, settings)
        return made[id(runtime)]

    app = create_service_app(
        settings,
        title="Data-quality scoring",
        description="An explainable quality score, grade and flags for every observation.",
        version="0.1.0",
        prefixes=PREFIXES,
        routers=[build_router(settings)],
        bus=bus,
        migrations=MIGRATIONS,
        consumers=consumers(parts_of),
    )
    runtime: ServiceRuntime = app.state.runtime
    parts = app.state.parts = parts_of(runtime)
    if settings.preload:
        # The taxonomy and geography take seconds to load: in the background, not at start.
        # Until they are in, events wait for them, so the service says it is not ready
        # (orchestrators and load balancers hold traffic back; scores are not provisional).
        loading: list[asyncio.Task[None]] = []
        runtime.add_readiness("knowledge", lambda: parts.knowledge.loaded)

        async def start() -> None:
            loading.append(asyncio.create_task(parts.knowledge.load()))

        async def stop() -> None:
            for task in loading:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

        runtime.add_background(start, stop)
    return app
