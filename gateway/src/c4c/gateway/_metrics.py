"""The gateway's Prometheus metrics (``c4c_gateway_*``), next to the shared ``c4c_http_*``
ones: RED per route (the matched prefix) and per upstream replica, retries, breakers and
refused requests."""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from c4c.shared.metrics import labelled

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

REQUESTS = Counter(
    "c4c_gateway_requests",
    "Proxied requests answered, by route (path prefix), method and status.",
    ["route", "method", "status"],
)
DURATION = Histogram(
    "c4c_gateway_request_duration_seconds",
    "Time to answer a proxied request, body streamed included, by route.",
    ["route", "method"],
    buckets=_BUCKETS,
)
UPSTREAM_REQUESTS = Counter(
    "c4c_gateway_upstream_requests",
    "Calls to an upstream replica, by outcome: its status code, or connect_error, timeout, error.",
    ["upstream", "outcome"],
)
UPSTREAM_DURATION = Histogram(
    "c4c_gateway_upstream_duration_seconds",
    "Time from sending a request to an upstream replica to its response headers.",
    ["upstream"],
    buckets=_BUCKETS,
)
RETRIES = Counter(
    "c4c_gateway_retries", "Requests sent again after a connection error, by route.", ["route"]
)
BREAKER_STATE = Gauge(
    "c4c_gateway_breaker_state",
    "Circuit breaker of an upstream replica: 0 closed, 1 half-open, 2 open.",
    ["upstream"],
)
BREAKER_OPENED = Counter(
    "c4c_gateway_breaker_opened", "Times a replica's breaker opened.", ["upstream"]
)
RATE_LIMITED = Counter(
    "c4c_gateway_rate_limited",
    "Requests refused with 429, by route and policy (burst, daily).",
    ["route", "policy"],
)
AUTH_REFUSED = Counter(
    "c4c_gateway_auth_refused",
    "Requests refused for their credentials (401) or scopes (403), by route and reason.",
    ["route", "reason"],
)

ROUTE_KEY = "c4c_gateway_route"
"""Where the proxy notes the matched prefix in the request's state, for the metrics."""


class RouteMetricsMiddleware:
    """Counts and times every proxied request by route, once its body has streamed."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            route = scope.get("state", {}).get(ROUTE_KEY)
            if route is not None:
                method = scope["method"]
                labelled(REQUESTS, route, method, str(status)).inc()
                labelled(DURATION, route, method).observe(time.perf_counter() - started)
