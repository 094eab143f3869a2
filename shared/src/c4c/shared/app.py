"""The app factory every service is built with, and the runtime that owns what a service
runs besides its routes: its database, its bus subscriptions and its outbox relay.

A service alone runs its runtime from the app's lifespan. In embedded mode the gateway runs
all runtimes over one shared bus with :func:`run_together`, which shuts down in the order
that loses nothing: relays flush, the bus drains, then databases close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.middleware import Middleware
from fastapi.responses import JSONResponse
from starlette.responses import Response

from c4c.shared.bus import CloudEvent, EventBus, Handler, bus_from_settings, new_event
from c4c.shared.bus._topic import topic_matches
from c4c.shared.db import Database
from c4c.shared.http import BodyLimitMiddleware, RequestContextMiddleware
from c4c.shared.logs import configure_logging
from c4c.shared.metrics import metrics_endpoint
from c4c.shared.outbox import Outbox
from c4c.shared.problems import install_problem_handlers, problem_response, problem_type
from c4c.shared.settings import ServiceSettings

log = logging.getLogger("c4c.app")

Consumers = Mapping[str, Handler]
"""Event-type pattern → handler; all of a service's patterns feed its one queue."""


class ServiceRuntime:
    def __init__(
        self,
        settings: ServiceSettings,
        *,
        bus: EventBus | None = None,
        migrations: Sequence[str] = (),
        consumers: Callable[[ServiceRuntime], Consumers] | None = None,
    ) -> None:
        self.settings = settings
        self.service = settings.service_name
        self.db = Database(settings.resolved_database_url, schema=settings.resolved_database_schema)
        self.owns_bus = bus is None
        self.bus = bus if bus is not None else bus_from_settings(settings)
        self.outbox = Outbox(
            self.db, self.bus, service=self.service, poll_interval=settings.outbox_poll_interval
        )
        self.queue = f"c4c.{self.service}"
        self._migrations = migrations
        self._consumers = consumers

    def event(self, type: str, data: Any, *, subject: str | None = None) -> CloudEvent:
        """A new event from this service, carrying the request id in hand."""
        return new_event(self.service, type, data, subject=subject)

    async def prepare(self) -> None:
        """Migrate the database and bind the service's queue; nothing is sent yet."""
        await self.db.migrate(self._migrations)
        consumers = self._consumers(self) if self._consumers else {}
        if consumers:
            await self.bus.subscribe(self.queue, list(consumers), _dispatcher(consumers))

    async def start(self) -> None:
        await self.prepare()
        if self.owns_bus:
            await self.bus.start()
        await self.outbox.start()
        log.info("service started", extra={"service": self.service})

    async def stop_producing(self) -> None:
        await self.outbox.stop(self.settings.shutdown_timeout / 3)

    async def close(self) -> None:
        if self.owns_bus:
            await self.bus.close(self.settings.shutdown_timeout)
        await self.db.dispose()

    async def ready(self) -> dict[str, bool]:
        database, bus = await asyncio.gather(self.db.ping(), self.bus.ping())
        return {"database": database, "bus": bus}

    @contextlib.asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.stop_producing()
            await self.close()


def _dispatcher(consumers: Consumers) -> Handler:
    async def dispatch(event: CloudEvent) -> None:
        for pattern, handler in consumers.items():
            if topic_matches(pattern, event.type):
                await handler(event)

    return dispatch


@contextlib.asynccontextmanager
async def run_together(
    runtimes: Sequence[ServiceRuntime], bus: EventBus, *, timeout: float = 30.0
) -> AsyncIterator[None]:
    """Run several services on one shared bus (embedded mode). Every queue is bound before
    any relay sends, so no service misses an event published while the others start."""
    for runtime in runtimes:
        await runtime.prepare()
    await bus.start()
    for runtime in runtimes:
        await runtime.outbox.start()
    try:
        yield
    finally:
        for runtime in runtimes:
            await runtime.stop_producing()
        await bus.close(timeout)
        for runtime in runtimes:
            await runtime.close()


def create_service_app(
    settings: ServiceSettings,
    *,
    title: str,
    description: str,
    version: str,
    prefixes: Sequence[str],
    routers: Sequence[APIRouter] = (),
    bus: EventBus | None = None,
    migrations: Sequence[str] = (),
    consumers: Callable[[ServiceRuntime], Consumers] | None = None,
) -> FastAPI:
    """A service's FastAPI app: its routers, under ``prefixes`` by convention, plus
    ``/healthz``, ``/readyz``, ``/metrics`` and the OpenAPI document at the root and under
    the first prefix (so the gateway reaches them), problem documents for every error,
    request ids, metrics, structured access logs and a body size limit."""
    runtime = ServiceRuntime(settings, bus=bus, migrations=migrations, consumers=consumers)
    app = FastAPI(
        title=title,
        description=description,
        version=version,
        lifespan=runtime.lifespan,
        middleware=[
            Middleware(RequestContextMiddleware, service=settings.service_name),
            Middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes),
        ],
    )
    app.state.runtime = runtime
    app.state.prefixes = tuple(prefixes)
    install_problem_handlers(app)
    app.include_router(operations_router(runtime))
    if prefixes:
        app.include_router(operations_router(runtime), prefix=prefixes[0])
        app.add_api_route(
            f"{prefixes[0]}/openapi.json", app.openapi, methods=["GET"], include_in_schema=False
        )
    for router in routers:
        app.include_router(router)
    return app


def operations_router(runtime: ServiceRuntime) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive", "service": runtime.service}

    @router.get("/readyz")
    async def readyz(request: Request) -> Response:
        checks = await runtime.ready()
        if all(checks.values()):
            return JSONResponse({"status": "ready", "service": runtime.service, "checks": checks})
        failing = ", ".join(name for name, ok in checks.items() if not ok)
        return problem_response(
            503,
            type_=problem_type("not-ready"),
            title="Not ready",
            detail=f"Unreachable: {failing}",
            instance=request.url.path,
            checks=checks,
        )

    router.add_api_route("/metrics", metrics_endpoint, methods=["GET"])
    return router


def serve(app: FastAPI, settings: ServiceSettings) -> None:
    """Run ``app`` alone with uvicorn, logging as configured."""
    import uvicorn

    configure_logging(settings.log_level, settings.log_format)
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again; as an interrupt
    # (which uvicorn.run swallows) a graceful stop exits 0, as orchestrators expect.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        timeout_graceful_shutdown=int(settings.shutdown_timeout),
    )
