"""Builds the gateway's app, in front of remote upstreams or of embedded services."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence

import httpx
from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp

from c4c.gateway._clients import AsgiClient, NetworkClient, Timeouts, UpstreamClient
from c4c.gateway._identity import Identity
from c4c.gateway._metrics import RouteMetricsMiddleware
from c4c.gateway._ratelimit import DAY, DatabaseBackend, InMemoryBackend, RateLimiter
from c4c.gateway._tokens import TokenVerifier
from c4c.gateway._upstreams import (
    CircuitBreaker,
    Replica,
    Route,
    RoutingTable,
    Upstream,
    UpstreamSpec,
    remote_upstreams,
)
from c4c.gateway.api import router
from c4c.gateway.embedded import body_limits, in_process_upstreams, load_services
from c4c.gateway.proxy import FrontDoor, Proxy, ProxyRoute
from c4c.gateway.service import ApiKeys
from c4c.gateway.settings import GatewaySettings
from c4c.shared.app import ServiceRuntime, create_service_app, run_together
from c4c.shared.auth import API_KEY_HEADER, ensure_principal_secret
from c4c.shared.bus import EventBus, bus_from_settings

log = logging.getLogger("c4c.gateway")

MIGRATIONS = "c4c.gateway:migrations"
DEV_KEY_FILE = "dev-api-key"
UNLIMITED = sys.maxsize


def _client(
    url: str, transport: httpx.AsyncBaseTransport | None, settings: GatewaySettings
) -> UpstreamClient:
    if transport is not None:
        return AsgiClient(url, transport)
    return NetworkClient(
        url,
        max_connections=settings.upstream_max_connections,
        keepalive_seconds=settings.upstream_keepalive_seconds,
    )


def routing_table(specs: Sequence[UpstreamSpec], settings: GatewaySettings) -> RoutingTable:
    routes = []
    for spec in specs:
        replicas = [
            Replica(
                url,
                _client(url, transport, settings),
                CircuitBreaker(
                    url,
                    failures=settings.breaker_failures,
                    open_seconds=settings.breaker_open_seconds,
                ),
            )
            for url, transport in spec.replicas
        ]
        upstream = Upstream(spec.name, replicas)
        for prefix in spec.prefixes:
            options = settings.routes.get(prefix)
            timeouts = Timeouts(
                connect=(options and options.connect_timeout) or settings.upstream_connect_timeout,
                read=(options and options.read_timeout) or settings.upstream_read_timeout,
            )
            routes.append(Route(prefix, upstream, timeouts))
    return RoutingTable(routes)


def create_app(settings: GatewaySettings | None = None, bus: EventBus | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    embedded = not settings.upstreams
    # Before the embedded services first need it: they read the same file.
    secret = ensure_principal_secret(settings)
    if embedded:
        bus = bus or bus_from_settings(settings)
        services = load_services(bus)
        specs = in_process_upstreams(services)
        limits = body_limits(services)
    else:
        services = []
        specs = remote_upstreams(settings.upstreams)
        # The upstream enforces its own limit (the body is streamed to it, never held here).
        limits = dict.fromkeys((p for spec in specs for p in spec.prefixes), UNLIMITED)
    limits |= {
        prefix: options.max_body_bytes
        for prefix, options in settings.routes.items()
        if options.max_body_bytes is not None
    }
    app = create_service_app(
        settings,
        title="Cos4Cloud API gateway",
        description="The single front door of the Cos4Cloud suite. Send an API key in the "
        f"{API_KEY_HEADER} header (or the api-key query parameter), or a MOBIS access token "
        "as a bearer token.",
        version="0.1.0",
        prefixes=(),
        routers=[router],
        bus=bus,
        migrations=[MIGRATIONS],
        body_limits=limits,
        docs=False,
        accept_principal=False,
    )
    gateway: ServiceRuntime = app.state.runtime
    keys = ApiKeys(gateway.db, cache_seconds=settings.api_key_cache_seconds)
    tokens = None
    if settings.jwks_url:
        tokens = TokenVerifier(
            settings.jwks_url,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            cache_seconds=settings.jwks_cache_seconds,
        )
    table = routing_table(specs, settings)
    backend = (
        DatabaseBackend(gateway.db)
        if settings.rate_limit_backend == "database"
        else InMemoryBackend()
    )
    limiter = RateLimiter(
        backend, per_second=settings.rate_limit_per_second, burst=settings.rate_limit_burst
    )
    if isinstance(backend, DatabaseBackend):
        bucket_window = limiter.burst.window if limiter.burst else DAY
        gateway.add_periodic(
            "rate-limit-pruning",
            lambda: backend.prune(time.time(), bucket_window=bucket_window),
            interval=settings.rate_limit_prune_interval,
        )
    app.state.proxy = proxy = Proxy(
        table,
        Identity(keys, tokens, settings.public_routes),
        limiter,
        secret=secret,
        trusted_proxies=settings.trusted_proxies,
        retries=settings.upstream_retries,
    )
    # A path no route knows goes to the proxy, which answers 404 for it; a known path with
    # another method stays the router's 405 (with Allow).
    app.router.default = proxy
    app.add_middleware(RouteMetricsMiddleware)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID", "RateLimit", "RateLimit-Policy", "Retry-After"],
        )
    # Proxied paths (by prefix alone) skip FastAPI's layers: through the same middleware,
    # in the same order, to the proxy. Built now, so no middleware can be added later.
    proxied: ASGIApp = proxy
    for cls, args, kwargs in reversed(app.user_middleware):
        proxied = cls(proxied, *args, **kwargs)
    app.middleware_stack = FrontDoor(ProxyRoute(proxy), proxied, app.build_middleware_stack())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            if embedded:
                runtimes = [gateway, *(s.state.runtime for s in services)]
                async with run_together(runtimes, gateway.bus, timeout=settings.shutdown_timeout):
                    await _first_start(keys, settings)
                    yield
            else:
                async with gateway.lifespan(app):
                    yield
        finally:
            await table.aclose()
            if tokens is not None:
                await tokens.aclose()

    app.router.lifespan_context = lifespan
    return app


async def _first_start(keys: ApiKeys, settings: GatewaySettings) -> None:
    """A new embedded installation gets a development key with every scope, shown once and
    kept (mode 600) for its owner."""
    secret = await keys.create_development_key()
    if secret is None:
        return
    path = settings.data_dir / DEV_KEY_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(secret + "\n")
    print(
        f"Development API key (every scope), saved in {path}:\n  {secret}\n"
        f"Send it as the {API_KEY_HEADER} header, e.g. "
        f'curl -H "{API_KEY_HEADER}: {secret}" http://{settings.host}:{settings.port}/ingest/...',
        flush=True,
    )
    log.info("development API key created", extra={"path": str(path)})
