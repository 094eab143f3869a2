"""The routing table: path prefix → the service behind it → its replicas, each with its own
client (see ``_clients``) and circuit breaker.

A replica's breaker opens after ``failures`` consecutive errors or timeouts; while open the
replica is skipped (passive health), and when all of a service's replicas are open the
gateway answers 503 with ``Retry-After``. After ``open_seconds`` one request goes through
as a probe (half-open): it closes the breaker or opens it again.
"""

from __future__ import annotations

import enum
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx

from c4c.gateway._clients import Timeouts, UpstreamClient
from c4c.gateway._metrics import BREAKER_OPENED, BREAKER_STATE
from c4c.shared.problems import NotFound, ServiceUnavailable


class UpstreamUnavailable(ServiceUnavailable):
    code, title = "upstream-unavailable", "Service temporarily unavailable"


class BreakerState(enum.IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        *,
        failures: int,
        open_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.threshold = failures
        self.open_seconds = open_seconds
        self.clock = clock
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self._gauge = BREAKER_STATE.labels(name)
        self._gauge.set(0)

    def acquire(self) -> bool:
        """May a call go now? An expired open breaker lets exactly one probe through."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN and self.retry_after() <= 0:
            self._set(BreakerState.HALF_OPEN)
            return True
        return False

    def success(self) -> None:
        self.failures = 0
        if self.state is not BreakerState.CLOSED:
            self._set(BreakerState.CLOSED)

    def failure(self) -> None:
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN or self.failures >= self.threshold:
            if self.state is not BreakerState.OPEN:
                BREAKER_OPENED.labels(self.name).inc()
            self.opened_at = self.clock()
            self._set(BreakerState.OPEN)

    def release(self) -> None:
        """A call ended with no verdict (the caller went away): let another probe try."""
        if self.state is BreakerState.HALF_OPEN:
            self._set(BreakerState.OPEN)
            self.opened_at = self.clock() - self.open_seconds

    def retry_after(self) -> float:
        return self.opened_at + self.open_seconds - self.clock()

    def _set(self, state: BreakerState) -> None:
        self.state = state
        self._gauge.set(state.value)


@dataclass(eq=False)
class Replica:
    url: str
    client: UpstreamClient
    breaker: CircuitBreaker


@dataclass(eq=False)
class Upstream:
    """One service (the scope a caller needs for it) and its replicas, taken in turn."""

    name: str
    replicas: Sequence[Replica]
    _turns: itertools.count[int] = field(default_factory=itertools.count)

    def pick(self, exclude: Sequence[Replica] = ()) -> Replica | None:
        """The next replica (round-robin) whose breaker lets a call through."""
        start = next(self._turns)
        count = len(self.replicas)
        for step in range(count):
            replica = self.replicas[(start + step) % count]
            if replica not in exclude and replica.breaker.acquire():
                return replica
        return None

    def unavailable(self) -> UpstreamUnavailable:
        wait = min(r.breaker.retry_after() for r in self.replicas)
        seconds = max(1, math.ceil(wait))
        return UpstreamUnavailable(
            f"The {self.name} service is failing; try again in {seconds} s.",
            headers={"Retry-After": str(seconds)},
        )


@dataclass(frozen=True)
class Route:
    prefix: str
    upstream: Upstream
    timeouts: Timeouts


class RoutingTable:
    def __init__(self, routes: Sequence[Route]) -> None:
        # Longest prefix first, so /plantid/v1 wins over /plantid.
        self.routes = sorted(routes, key=lambda r: len(r.prefix), reverse=True)
        # Each service once, under the first prefix it was given (its primary one).
        self.services: dict[str, Upstream] = {}
        for route in routes:
            if route.upstream not in self.services.values():
                self.services[route.prefix] = route.upstream

    def find(self, path: str) -> Route | None:
        for route in self.routes:
            if path == route.prefix or path.startswith(route.prefix.rstrip("/") + "/"):
                return route
        return None

    def match(self, path: str) -> Route:
        route = self.find(path)
        if route is None:
            raise NotFound(f"No service serves {path}.")
        return route

    async def aclose(self) -> None:
        for upstream in self.services.values():
            for replica in upstream.replicas:
                await replica.client.aclose()


@dataclass(frozen=True)
class UpstreamSpec:
    """What the routing table is built from: a service, its prefixes (the first is its
    primary one: health, docs) and its replicas' URLs, each with a transport of its own
    (an in-process ASGI app) or None (the network)."""

    name: str
    prefixes: Sequence[str]
    replicas: Sequence[tuple[str, httpx.AsyncBaseTransport | None]]


def remote_upstreams(upstreams: dict[str, list[str]]) -> list[UpstreamSpec]:
    """``C4C_GATEWAY_UPSTREAMS``: prefixes with the same URLs are one service (plantid:
    /plantid and /v2), named after the first of them, so that it is pooled, balanced and
    checked as one."""
    by_urls: dict[tuple[str, ...], list[str]] = {}
    for prefix, urls in upstreams.items():
        by_urls.setdefault(tuple(urls), []).append(prefix)
    return [
        UpstreamSpec(prefixes[0].strip("/").split("/")[0], prefixes, [(u, None) for u in urls])
        for urls, prefixes in by_urls.items()
    ]
