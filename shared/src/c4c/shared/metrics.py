"""Prometheus metrics every service emits, named ``c4c_*`` and labelled by service.

They live in the process-wide registry: in embedded mode one ``/metrics`` shows every
service (told apart by the ``service`` label), in distributed mode each process its own.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from starlette.requests import Request
from starlette.responses import Response

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

HTTP_REQUESTS = Counter(
    "c4c_http_requests",
    "HTTP requests answered, by route template and status code.",
    ["service", "method", "route", "status"],
)
HTTP_DURATION = Histogram(
    "c4c_http_request_duration_seconds",
    "Time to answer an HTTP request, by route template.",
    ["service", "method", "route"],
    buckets=_LATENCY_BUCKETS,
)
HTTP_IN_FLIGHT = Gauge(
    "c4c_http_requests_in_flight", "HTTP requests being answered now.", ["service"]
)

BUS_PUBLISHED = Counter(
    "c4c_bus_published", "Events published and confirmed by the bus.", ["source", "type"]
)
BUS_PUBLISH_FAILURES = Counter(
    "c4c_bus_publish_failures", "Publishes that were not confirmed in time.", ["source", "type"]
)
BUS_RECONNECTS = Counter(
    "c4c_bus_reconnects", "Times the broker connection was lost and restored.", ["connection"]
)
BUS_CONSUMED = Counter(
    "c4c_bus_consumed",
    "Deliveries handled, by outcome: ack, retry, dead_letter, invalid.",
    ["queue", "type", "outcome"],
)
BUS_HANDLER_DURATION = Histogram(
    "c4c_bus_handler_duration_seconds",
    "Time an event handler took, successful or not.",
    ["queue", "type"],
    buckets=_LATENCY_BUCKETS,
)
BUS_DEAD_LETTERED = Counter(
    "c4c_bus_dead_lettered", "Events parked in a dead-letter queue.", ["queue", "type"]
)
EVENTS_DUPLICATE = Counter(
    "c4c_events_duplicate",
    "Redelivered events an idempotent consumer skipped.",
    ["service", "consumer"],
)
OUTBOX_BACKLOG = Gauge(
    "c4c_outbox_backlog", "Outbox events written but not yet published.", ["service"]
)
OUTBOX_RELAYED = Counter("c4c_outbox_relayed", "Outbox events the relay published.", ["service"])


@lru_cache(maxsize=4096)
def labelled(metric: MetricWrapperBase, *values: str) -> Any:
    """``metric.labels(*values)``, looked up once: the bus calls this for every event."""
    return metric.labels(*values)


async def metrics_endpoint(_: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
