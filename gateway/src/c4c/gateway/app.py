"""Builds the gateway's app, in front of remote upstreams or of embedded services."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI

from c4c.gateway.api import router
from c4c.gateway.embedded import in_process_routes, load_services
from c4c.gateway.proxy import Upstreams
from c4c.gateway.settings import GatewaySettings
from c4c.shared.app import ServiceRuntime, create_service_app, run_together
from c4c.shared.bus import EventBus, bus_from_settings


def create_app(settings: GatewaySettings | None = None, bus: EventBus | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    timeout = httpx.Timeout(
        settings.upstream_read_timeout, connect=settings.upstream_connect_timeout
    )
    embedded = not settings.upstreams
    if embedded:
        bus = bus or bus_from_settings(settings)
        services = load_services(bus)
        routes = in_process_routes(services, timeout)
    else:
        services = []
        # Prefixes with the same URLs are one service (plantid: /plantid and /v2): one set
        # of clients, so that it is pooled, balanced and health-checked as one.
        clients: dict[tuple[str, ...], list[httpx.AsyncClient]] = {}
        for urls in settings.upstreams.values():
            if tuple(urls) not in clients:
                clients[tuple(urls)] = [
                    httpx.AsyncClient(base_url=url, timeout=timeout) for url in urls
                ]
        routes = {prefix: clients[tuple(urls)] for prefix, urls in settings.upstreams.items()}
    app = create_service_app(
        settings,
        title="Cos4Cloud API gateway",
        description="The single front door of the Cos4Cloud suite.",
        version="0.1.0",
        prefixes=(),
        routers=[router],
        bus=bus,
    )
    upstreams = Upstreams(routes)
    app.state.upstreams = upstreams
    gateway: ServiceRuntime = app.state.runtime

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            if embedded:
                runtimes = [gateway, *(s.state.runtime for s in services)]
                async with run_together(runtimes, gateway.bus, timeout=settings.shutdown_timeout):
                    yield
            else:
                async with gateway.lifespan(app):
                    yield
        finally:
            await upstreams.aclose()

    app.router.lifespan_context = lifespan
    return app
