"""Embedded mode: every installed service (entry point group ``c4c.services``) runs in this
process on one shared bus, and the gateway reaches each through an ASGI transport — the
same proxy code path as in distributed mode. The gateway imports no service: it finds them.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points

from fastapi import FastAPI

from c4c.gateway._upstreams import UpstreamSpec
from c4c.shared.app import ServiceRuntime
from c4c.shared.asgi import StreamingASGITransport
from c4c.shared.bus import EventBus

log = logging.getLogger("c4c.gateway")

SERVICES_ENTRY_POINT = "c4c.services"


def load_services(bus: EventBus) -> list[FastAPI]:
    apps = []
    for entry in sorted(entry_points(group=SERVICES_ENTRY_POINT), key=lambda e: e.name):
        apps.append(entry.load()(bus=bus))
        log.info("embedded service loaded", extra={"service": entry.name})
    return apps


def in_process_upstreams(apps: list[FastAPI]) -> list[UpstreamSpec]:
    specs = []
    for app in apps:
        runtime: ServiceRuntime = app.state.runtime
        transport = StreamingASGITransport(app, raise_app_exceptions=False)
        url = f"http://{runtime.service}.embedded"
        specs.append(UpstreamSpec(runtime.service, app.state.prefixes, [(url, transport)]))
    return specs


def body_limits(apps: list[FastAPI]) -> dict[str, int]:
    """The body limits each embedded service enforces, by path prefix: the gateway refuses
    what the service would (its own default suits only its own routes)."""
    limits: dict[str, int] = {}
    for app in apps:
        limits |= app.state.body_limits
    return limits
