"""The app factory every service is built with, and the runtime that owns what a service
runs besides its routes: its database, its bus subscriptions and its outbox relay.

A service alone runs its runtime from the app's lifespan. In embedded mode the gateway runs
all runtimes over one shared bus with :func:`run_together`, which shuts down in the order
that loses nothing: relays flush, the bus drains, then databases close.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.middleware import Middleware
from fastapi.responses import JSONResponse
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from c4c.shared.auth import PrincipalMiddleware, document_api_keys
from c4c.shared.bus import CloudEvent, EventBus, Handler, bus_from_settings, new_event
from c4c.shared.bus._topic import topic_matches
from c4c.shared.clients import ServiceClients
from c4c.shared.db import Database
from c4c.shared.http import BodyLimitMiddleware, RequestContextMiddleware
from c4c.shared.logs import configure_logging
from c4c.shared.metrics import metrics_endpoint
from c4c.shared.outbox import Outbox
from c4c.shared.problems import (
    Refusals,
    RefusalShape,
    document_problems,
    install_problem_handlers,
    problem_response,
    problem_type,
)
from c4c.shared.settings import ServiceSettings

log = logging.getLogger("c4c.app")

Lifecycle = Callable[[], Awaitable[object]]
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
        self.db = Database(
            settings.resolved_database_url,
            schema=settings.resolved_database_schema,
            pool_size=settings.database_pool_size,
        )
        self.owns_bus = bus is None
        self.bus = bus if bus is not None else bus_from_settings(settings)
        self.outbox = Outbox(
            self.db, self.bus, service=self.service, poll_interval=settings.outbox_poll_interval
        )
        self.queue = f"{settings.bus_queue_prefix}.{self.service}"
        self.clients = ServiceClients(settings)
        self.app: ASGIApp | None = None
        """The service's app, once built: its in-process address in embedded mode."""
        self._migrations = migrations
        self._consumers = consumers
        self._background: list[tuple[Lifecycle, Lifecycle | None]] = []
        self._closers: list[Lifecycle] = []
        self._readiness: dict[str, Callable[[], bool]] = {}

    def add_background(self, start: Lifecycle, stop: Lifecycle | None = None) -> None:
        """Work the service runs besides requests and events (workers, resumed jobs): started
        once the service is up, stopped before the outbox's last flush and the bus drain."""
        self._background.append((start, stop))

    def add_periodic(
        self, name: str, work: Callable[[], Awaitable[bool]], *, interval: float
    ) -> Callable[[], None]:
        """Housekeeping run every ``interval`` seconds in the background, off every request's
        path. ``work`` answers whether more is left: then it runs again at once. A failing
        pass is logged and retried at the next interval. Returns ``wake``, which starts the
        next pass now (for work a request has just made)."""
        woken = asyncio.Event()

        async def loop() -> None:
            while True:
                woken.clear()
                try:
                    while await work():
                        pass
                except Exception:  # a bug or an outage must not end the housekeeping
                    log.exception("periodic work failed", extra={"work": name})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), interval)

        tasks: list[asyncio.Task[None]] = []

        async def start() -> None:
            tasks.append(asyncio.create_task(loop(), name=f"{self.service}-{name}"))

        async def stop() -> None:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            tasks.clear()

        self.add_background(start, stop)
        return woken.set

    def add_readiness(self, name: str, check: Callable[[], bool]) -> None:
        """A condition of the service's own for ``/readyz`` (a model or data still loading),
        besides its database and bus."""
        self._readiness[name] = check

    def add_closer(self, close: Lifecycle) -> None:
        """A resource handlers use (a model, an HTTP client): closed after the bus drained."""
        self._closers.append(close)

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
        await self.start_background()
        _freeze_heap()
        log.info("service started", extra={"service": self.service})

    async def start_background(self) -> None:
        for start, _ in self._background:
            await start()

    async def stop_producing(self) -> None:
        for _, stop in reversed(self._background):
            if stop is not None:
                await stop()
        await self.outbox.stop(self.settings.shutdown_timeout / 3)

    async def close(self) -> None:
        if self.owns_bus:
            await self.bus.close(self.settings.shutdown_timeout)
        for close in reversed(self._closers):
            await close()
        await self.clients.aclose()
        await self.db.dispose()

    async def ready(self) -> dict[str, bool]:
        database, bus = await asyncio.gather(self.db.ping(), self.bus.ping())
        own = {name: check() for name, check in self._readiness.items()}
        return {"database": database, "bus": bus} | own

    @contextlib.asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.stop_producing()
            await self.close()


GC_THRESHOLDS = (10_000, 10, 10)
"""Young collections every 10,000 allocations, not 700: a request allocates thousands of
short-lived objects, and what loads after start-up (quality's taxonomy) kept full passes
coming, each stopping the event loop for 35-65 ms (MOBIS embedded at 50 observations/s:
collections 1.0 → 0.2 ms of CPU an observation, measured)."""


def _freeze_heap() -> None:
    """Keep what start-up made (modules, models, tables) out of later garbage collections:
    a full collection over it stopped the event loop for about half a second."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


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
    any relay sends, so no service misses an event published while the others start. Each
    service reaches the others in process (``runtime.clients``)."""
    apps = {r.service: r.app for r in runtimes if r.app is not None}
    for runtime in runtimes:
        runtime.clients.use_in_process(apps)
    for runtime in runtimes:
        await runtime.prepare()
    await bus.start()
    for runtime in runtimes:
        await runtime.outbox.start()
    for runtime in runtimes:
        await runtime.start_background()
    _freeze_heap()
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
    body_limits: Mapping[str, int] | None = None,
    docs: bool = True,
    accept_principal: bool = True,
    refusal_shapes: Mapping[str, RefusalShape] | None = None,
    public_paths: Collection[str] = (),
) -> FastAPI:
    """A service's FastAPI app: its routers, under ``prefixes`` by convention, plus
    ``/healthz``, ``/readyz``, ``/metrics`` and the OpenAPI document at the root and under
    the first prefix (so the gateway reaches them), problem documents for every error,
    request ids, metrics, structured access logs, a body size limit (``body_limits``: other
    limits by path prefix) and the principal the gateway vouches for (see ``auth``).

    The gateway itself passes ``docs=False`` (it serves the merged documents) and
    ``accept_principal=False`` (it makes principals, it does not receive them).
    ``refusal_shapes``: the error shape, by path prefix, of what that middleware refuses
    (see :class:`~c4c.shared.problems.Refusals`); problem documents elsewhere.
    ``public_paths``: the service's own paths open to every caller, gateway or not, key or
    not (e.g. the public keys the gateway checks tokens against)."""
    runtime = ServiceRuntime(settings, bus=bus, migrations=migrations, consumers=consumers)
    refusals = Refusals(refusal_shapes)
    middleware = [
        Middleware(
            RequestContextMiddleware,
            service=settings.service_name,
            access_log=settings.access_log,
        )
    ]
    if accept_principal:
        operations = ["/healthz", "/readyz", "/metrics", "/openapi.json"]
        public = [*operations, "/docs", "/docs/oauth2-redirect", "/redoc"]
        public += [prefix + path for prefix in prefixes[:1] for path in operations]
        public += public_paths
        middleware.append(
            Middleware(
                PrincipalMiddleware, settings=settings, public_paths=public, refusals=refusals
            )
        )
    middleware.append(
        Middleware(
            BodyLimitMiddleware,
            max_bytes=settings.max_body_bytes,
            per_prefix=body_limits,
            refusals=refusals,
        )
    )
    app = FastAPI(
        title=title,
        description=description,
        version=version,
        lifespan=runtime.lifespan,
        middleware=middleware,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.runtime = runtime
    runtime.app = app
    app.state.prefixes = tuple(prefixes)
    # The largest body each path prefix takes: what a gateway in front must let through.
    app.state.body_limits = dict.fromkeys(prefixes, settings.max_body_bytes) | dict(
        body_limits or {}
    )
    install_problem_handlers(app)
    document_problems(app)
    if accept_principal and settings.api_keys and not settings.require_principal:
        document_api_keys(app)
    app.include_router(operations_router(runtime))
    if prefixes:
        app.include_router(operations_router(runtime), prefix=prefixes[0])
    if prefixes and docs:
        app.add_api_route(
            f"{prefixes[0]}/openapi.json", app.openapi, methods=["GET"], include_in_schema=False
        )
    operational = list(app.router.routes)
    for router in routers:
        _add_routes(app, router)
    # The service's routes first: routes are tried in order, and each one tried before the
    # match cost about 40 µs per request (0.4 ms behind the dozen operational ones).
    app.router.routes[:] = [r for r in app.router.routes if r not in operational] + operational
    return app


def _add_routes(app: FastAPI, router: APIRouter) -> None:
    """``router``'s routes, added to the app as they are when none of them is an included
    router: an included router is matched twice per request (to pick it, then within it),
    which cost about 30 µs of CPU per request, measured. Its routes already carry the
    router's prefix, tags and route class; ``app.dependency_overrides`` does not reach them
    (no service uses it). A router with nested routers or event handlers is included."""
    if (
        router.on_startup
        or router.on_shutdown
        or any(not isinstance(route, Route) for route in router.routes)
    ):
        app.include_router(router)
        return
    app.router.routes.extend(router.routes)


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
            detail=f"Not ready yet: {failing}",
            instance=request.url.path,
            checks=checks,
        )

    router.add_api_route("/metrics", metrics_endpoint, methods=["GET"])
    return router


def serve(app: FastAPI, settings: ServiceSettings, *, proxy_headers: bool = True) -> None:
    """Run ``app`` alone with uvicorn, logging as configured. ``proxy_headers=False`` keeps
    uvicorn from taking the client address from ``X-Forwarded-*`` (the gateway decides
    itself which proxies it trusts)."""
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
        proxy_headers=proxy_headers,
    )
