"""The reverse proxy: a request whose path starts with a prefix is authenticated, rate
limited and sent, body streaming, to one of that prefix's replicas; the answer streams back.
Embedded services are upstreams too, through an ASGI transport.

A request is sent again, to another replica, only when it never reached the first
(connection refused or not made in time) and only when repeating it is harmless: an
idempotent method, or a POST/PATCH carrying an ``Idempotency-Key``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable, Sequence
from ipaddress import IPv4Network, IPv6Network, ip_address
from urllib.parse import unquote_plus

import httpx
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from c4c.gateway._identity import Identity, MissingScope, Unauthorized
from c4c.gateway._metrics import (
    AUTH_REFUSED,
    RATE_LIMITED,
    RETRIES,
    ROUTE_KEY,
    UPSTREAM_DURATION,
    UPSTREAM_REQUESTS,
)
from c4c.gateway._ratelimit import RateLimiter, headers
from c4c.gateway._upstreams import Replica, Route, RoutingTable
from c4c.shared.auth import API_KEY_QUERY, PRINCIPAL_HEADER, Principal, sign_principal
from c4c.shared.context import request_id_var
from c4c.shared.metrics import labelled
from c4c.shared.problems import NotFound, ProblemError

Network = IPv4Network | IPv6Network

# RFC 9110 §7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
    }
)
# Set by the gateway itself, whatever the caller sent.
_REPLACED = frozenset(
    {
        b"x-request-id",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-api-key",
        PRINCIPAL_HEADER.lower().encode(),
    }
)
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
_SMALL_BODY = 64 * 1024  # answers up to this size are read whole: cheaper than streaming


class BadGateway(ProblemError):
    status, code, title = 502, "bad-gateway", "Bad Gateway"


class GatewayTimeout(ProblemError):
    status, code, title = 504, "gateway-timeout", "Gateway Timeout"


class TooManyRequests(ProblemError):
    status, code, title = 429, "rate-limited", "Too Many Requests"


def _hop_by_hop(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The fixed hop-by-hop names plus those the ``Connection`` header lists."""
    named = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
    }
    return HOP_BY_HOP | named


def _trusted(address: str, networks: Sequence[Network]) -> bool:
    try:
        ip = ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def forwarded_chain(request: Request, trusted: Sequence[Network]) -> list[str]:
    """The addresses the request came through, the client first: ``X-Forwarded-For`` is
    believed hop by hop from the right only as far as each hop is a trusted proxy."""
    chain = [request.client.host if request.client else ""]
    if trusted and _trusted(chain[0], trusted):
        prior = [
            hop.strip()
            for value in request.headers.getlist("x-forwarded-for")
            for hop in value.split(",")
            if hop.strip()
        ]
        while prior and _trusted(chain[0], trusted):
            chain.insert(0, prior.pop())
    return chain


def _query_without_key(query: bytes) -> bytes:
    """The query string less the ``api-key`` parameter: a credential goes no further."""
    if API_KEY_QUERY.encode() not in query:
        return query
    kept = [
        part
        for part in query.split(b"&")
        if unquote_plus(part.split(b"=", 1)[0].decode("latin-1")) != API_KEY_QUERY
    ]
    return b"&".join(kept)


class _Body:
    """The request body, streamed once; tells whether sending it has begun."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.started = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.started = True
        async for chunk in self.request.stream():
            if chunk:
                yield chunk


class Proxy:
    def __init__(
        self,
        table: RoutingTable,
        identity: Identity,
        limiter: RateLimiter,
        *,
        secret: bytes,
        trusted_proxies: Sequence[Network],
        retries: int,
    ) -> None:
        self.table = table
        self.identity = identity
        self.limiter = limiter
        self.secret = secret
        self.trusted = list(trusted_proxies)
        self.retries = retries

    async def handle(self, request: Request) -> Response:
        state = request.scope.setdefault("state", {})
        try:
            route = self.table.match(request.url.path)
        except NotFound:
            state[ROUTE_KEY] = "<unmatched>"
            raise
        state[ROUTE_KEY] = route.prefix
        chain = forwarded_chain(request, self.trusted)
        try:
            caller = await self.identity.authenticate(request, chain[0])
            self.identity.authorize(caller, route.upstream.name)
        except (Unauthorized, MissingScope) as exc:
            labelled(AUTH_REFUSED, route.prefix, exc.code).inc()
            raise
        decisions = await self.limiter.check(
            caller.limit_key, daily_quota=caller.daily_quota, now=time.time()
        )
        limits = headers(decisions)
        for decision in decisions:
            if not decision.allowed:
                labelled(RATE_LIMITED, route.prefix, decision.policy.name).inc()
                raise TooManyRequests(
                    f"Over the {decision.policy.name} limit; try again in "
                    f"{decision.retry_after} s.",
                    headers=limits,
                )
        response = await self._forward(request, route, chain, caller.principal)
        response.raw_headers += [(k.lower().encode(), v.encode()) for k, v in limits.items()]
        return response

    def _headers(
        self, request: Request, chain: list[str], principal: Principal
    ) -> list[tuple[bytes, bytes]]:
        raw: list[tuple[bytes, bytes]] = request.scope["headers"]
        drop = _hop_by_hop(raw) | _REPLACED
        forwarded = [(k, v) for k, v in raw if k not in drop]
        proto, host = request.url.scheme, request.headers.get("host", "")
        if len(chain) > 1:  # came through a trusted proxy: believe what it says
            proto = request.headers.get("x-forwarded-proto", proto)
            host = request.headers.get("x-forwarded-host", host)
        forwarded += [
            (b"x-request-id", (request_id_var.get() or "").encode()),
            (b"x-forwarded-for", ", ".join(chain).encode("latin-1")),
            (b"x-forwarded-proto", proto.encode("latin-1")),
            (b"x-forwarded-host", host.encode("latin-1")),
            (PRINCIPAL_HEADER.lower().encode(), sign_principal(principal, self.secret).encode()),
        ]
        return forwarded

    async def _forward(
        self, request: Request, route: Route, chain: list[str], principal: Principal
    ) -> Response:
        has_body = "content-length" in request.headers or "transfer-encoding" in request.headers
        body = _Body(request) if has_body else None
        retryable = request.method in IDEMPOTENT or "idempotency-key" in request.headers
        # The path as the client sent it: decoding it would turn %2F into a separator.
        target = request.scope.get("raw_path") or request.url.path.encode()
        if query := _query_without_key(request.scope.get("query_string", b"")):
            target += b"?" + query
        headers = self._headers(request, chain, principal)
        tried: list[Replica] = []
        failed: ProblemError | None = None
        while True:
            replica = route.upstream.pick(exclude=tried)
            if replica is None:
                raise failed or route.upstream.unavailable()
            if tried:
                labelled(RETRIES, route.prefix).inc()
            tried.append(replica)
            try:
                upstream = await self._send(replica, route, request.method, target, headers, body)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                if isinstance(exc, httpx.ConnectTimeout):
                    failed = GatewayTimeout("The service could not be reached in time.")
                else:
                    failed = BadGateway("The service could not be reached.")
                never_sent = body is None or not body.started
                if retryable and never_sent and len(tried) <= self.retries:
                    continue
                raise failed from exc
            return await _relay(upstream)

    @staticmethod
    async def _send(
        replica: Replica,
        route: Route,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: _Body | None,
    ) -> httpx.Response:
        """One call to one replica, its verdict given to the replica's breaker."""
        upstream_request = replica.client.build_request(
            method,
            httpx.URL(raw_path=target),
            headers=headers,
            content=body,
            timeout=route.timeout,
        )
        started = time.perf_counter()
        try:
            upstream = await replica.client.send(upstream_request, stream=True)
        except httpx.PoolTimeout as exc:  # our own pool is full: not the replica's fault
            replica.breaker.release()
            raise GatewayTimeout("Too many requests in flight to the service.") from exc
        except (httpx.ConnectError, httpx.ConnectTimeout):
            replica.breaker.failure()
            labelled(UPSTREAM_REQUESTS, replica.url, "connect_error").inc()
            raise  # the caller may retry elsewhere
        except httpx.TimeoutException as exc:
            replica.breaker.failure()
            labelled(UPSTREAM_REQUESTS, replica.url, "timeout").inc()
            raise GatewayTimeout("The service did not answer in time.") from exc
        except httpx.TransportError as exc:
            replica.breaker.failure()
            labelled(UPSTREAM_REQUESTS, replica.url, "error").inc()
            raise BadGateway("The service closed the connection without answering.") from exc
        except BaseException:
            replica.breaker.release()  # cancelled (the caller left): no verdict
            raise
        replica.breaker.success()
        labelled(UPSTREAM_REQUESTS, replica.url, str(upstream.status_code)).inc()
        labelled(UPSTREAM_DURATION, replica.url).observe(time.perf_counter() - started)
        return upstream


async def _relay(upstream: httpx.Response) -> Response:
    """The upstream's answer, headers as they came (less hop-by-hop ones), body streaming
    unless it is small and of known length."""
    # Raw pairs keep repeated headers (Set-Cookie, Link) apart.
    raw = upstream.headers.raw
    drop = _hop_by_hop(raw)
    kept = [(k.lower(), v) for k, v in raw if k.lower() not in drop]
    length = upstream.headers.get("content-length", "")
    response: Response
    if length.isdigit() and int(length) <= _SMALL_BODY:
        try:
            content = b"".join([chunk async for chunk in upstream.aiter_raw()])
        except httpx.TransportError as exc:
            raise BadGateway("The service broke off its answer.") from exc
        finally:
            await upstream.aclose()
        response = Response(content, status_code=upstream.status_code)
    else:
        response = StreamingResponse(
            upstream.aiter_raw(),
            status_code=upstream.status_code,
            background=BackgroundTask(upstream.aclose),
        )
    response.raw_headers = kept
    return response
