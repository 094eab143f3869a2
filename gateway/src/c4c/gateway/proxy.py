"""The reverse proxy: a request whose path starts with a prefix is authenticated, rate
limited and sent, body streaming, to one of that prefix's replicas; the answer streams back.
Embedded services are upstreams too, through an ASGI transport.

A request is sent again, to another replica, only when it never reached the first
(connection refused or not made in time) and only when repeating it is harmless: an
idempotent method, or a POST/PATCH carrying an ``Idempotency-Key``.

The proxy is a plain ASGI app behind the gateway's middleware (request ids, body limits,
CORS, metrics) that answers its own refusals with problem documents: no FastAPI layers,
request objects, dependencies or response classes on the hot path (see :class:`FrontDoor`);
small answers are sent in one message, larger ones stream.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable, Sequence
from http import HTTPStatus
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import NoReturn

from starlette.background import BackgroundTask
from starlette.datastructures import URL, Headers
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Match, NoMatchFound
from starlette.types import ASGIApp, Receive, Scope, Send

from c4c.gateway._clients import (
    ConnectFailed,
    ConnectTimedOut,
    PoolFull,
    ReadTimedOut,
    UpstreamError,
    UpstreamResponse,
)
from c4c.gateway._identity import Identity, MissingScope, Unauthorized
from c4c.gateway._metrics import (
    AUTH_REFUSED,
    RATE_LIMITED,
    RETRIES,
    ROUTE_KEY,
    UPSTREAM_DURATION,
    UPSTREAM_REQUESTS,
)
from c4c.gateway._ratelimit import RateLimiter, rate_limit_headers
from c4c.gateway._upstreams import Replica, Route, RoutingTable
from c4c.shared.auth import PRINCIPAL_HEADER, Principal, query_without_key, sign_principal
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
# Fields of the upstream's answer the gateway's server sets itself (once: never twice).
_SERVER_SET = frozenset({b"date", b"server"})
PROXIED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
_SMALL_BODY = 64 * 1024  # answers up to this size are read whole: cheaper than streaming
# A signed principal is reused this long: services accept it for PRINCIPAL_MAX_AGE (300 s),
# and signing (JSON, base64, HMAC) per request is a measurable share of the gateway's time.
_SIGNATURE_REUSE = 5.0
_SIGNATURES = 10_000  # principals remembered at most


class BadGateway(ProblemError):
    status, code, title = 502, "bad-gateway", "Bad Gateway"


class GatewayTimeout(ProblemError):
    status, code, title = 504, "gateway-timeout", "Gateway Timeout"


class TooManyRequests(ProblemError):
    status, code, title = 429, "rate-limited", "Too Many Requests"


PLANTNET_PREFIX = "/v2"
"""Pl@ntNet's API, which plantid serves: its clients read errors in Pl@ntNet's shape."""


def _refusal(exc: ProblemError, path: str) -> Response:
    """The gateway's own refusal: a problem document, or under Pl@ntNet's API the shape its
    clients read (``statusCode``, ``error``, ``message``), as plantid itself answers."""
    if path != PLANTNET_PREFIX and not path.startswith(PLANTNET_PREFIX + "/"):
        return exc.to_response(instance=path)
    message = "Invalid API key" if isinstance(exc, Unauthorized) else str(exc.detail)
    body = {"statusCode": exc.status, "error": HTTPStatus(exc.status).phrase, "message": message}
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


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


def forwarded_chain(scope: Scope, headers: Headers, trusted: Sequence[Network]) -> list[str]:
    """The addresses the request came through, the client first: ``X-Forwarded-For`` is
    believed hop by hop from the right only as far as each hop is a trusted proxy."""
    client = scope.get("client")
    chain = [client[0] if client else ""]
    if trusted and _trusted(chain[0], trusted):
        prior = [
            hop.strip()
            for value in headers.getlist("x-forwarded-for")
            for hop in value.split(",")
            if hop.strip()
        ]
        while prior and _trusted(chain[0], trusted):
            chain.insert(0, prior.pop())
    return chain


class _Body:
    """The request body, streamed once; tells whether sending it has begun, and keeps what
    stopped it on our side (the size limit, the caller leaving), which an HTTP client would
    otherwise report as a mere connection error."""

    def __init__(self, receive: Receive) -> None:
        self.receive = receive
        self.started = False
        self.error: BaseException | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.started = True
        while True:
            try:
                message = await self.receive()
            except Exception as exc:
                self.error = exc
                raise
            if message["type"] == "http.disconnect":
                self.error = ClientDisconnect()
                raise self.error
            if chunk := message.get("body", b""):
                yield chunk
            if not message.get("more_body", False):
                return


_MATCHED = "c4c_gateway.route"  # scope key: the route ProxyRoute matched


class ProxyRoute(BaseRoute):
    """The proxied paths: those under a service's prefix (none of the gateway's own routes
    is). A route, so that the shared request metrics name it by its template."""

    path = "/{path:path}"  # the route template in the shared request metrics

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http" and scope["method"] in PROXIED_METHODS:
            route = self.proxy.table.find(scope["path"])
            if route is not None:
                return Match.FULL, {_MATCHED: route, "route": self}
        return Match.NONE, {}

    def url_path_for(self, name: str, /, **path_params: object) -> NoReturn:
        raise NoMatchFound(name, path_params)


class FrontDoor:
    """The gateway app's outermost layer. A proxied request goes through the gateway's own
    middleware (``proxied``: request ids, body limits, CORS, metrics) straight to the proxy;
    anything else through the whole app (``rest``), whose last route sends what no other
    route took to the proxy, which answers 404. FastAPI's own layers (exception handlers,
    telemetry, exit stack, routing) did nothing for a proxied request (the proxy answers its
    own refusals) and cost 3.5 % of its instructions (callgrind, in process)."""

    def __init__(self, route: ProxyRoute, proxied: ASGIApp, rest: ASGIApp) -> None:
        self.route = route
        self.proxied = proxied
        self.rest = rest

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match, child = self.route.matches(scope)
        if match is Match.FULL:
            scope.update(child)
            await self.proxied(scope, receive, send)
        else:
            await self.rest(scope, receive, send)


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
        self._signatures: dict[Principal, tuple[float, str]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answers its own refusals with problem documents, so that a proxied request needs
        no exception middleware in front (see ``app``). Every refusal comes before the answer
        starts: once it has, only the upstream's stream can fail."""
        try:
            upstream, head, content = await self._answer(scope, receive)
        except ProblemError as exc:
            await _refusal(exc, URL(scope=scope).path)(scope, receive, send)
            return
        if content is not None:
            await send({"type": "http.response.start", "status": upstream.status, "headers": head})
            await send({"type": "http.response.body", "body": content})
            return
        response = StreamingResponse(
            upstream.stream(),
            status_code=upstream.status,
            background=BackgroundTask(upstream.aclose),
        )
        response.raw_headers = head
        await response(scope, receive, send)

    async def _answer(
        self, scope: Scope, receive: Receive
    ) -> tuple[UpstreamResponse, list[tuple[bytes, bytes]], bytes | None]:
        """The upstream's answer: its response, the head to send back, and the body when it
        is small enough to be read whole (None: stream it)."""
        state = scope.setdefault("state", {})
        path: str = scope["path"]
        route = scope.get(_MATCHED)
        if route is None:
            try:
                route = self.table.match(path)
            except NotFound:
                state[ROUTE_KEY] = "<unmatched>"
                raise
        state[ROUTE_KEY] = route.prefix
        headers = Headers(scope=scope)
        chain = forwarded_chain(scope, headers, self.trusted)
        try:
            caller = await self.identity.authenticate(
                path, headers, scope.get("query_string", b""), chain[0]
            )
            self.identity.authorize(caller, route.upstream.name)
        except (Unauthorized, MissingScope) as exc:
            labelled(AUTH_REFUSED, route.prefix, exc.code).inc()
            raise
        now = time.time()
        decisions = await self.limiter.check(
            caller.limit_key, daily_quota=caller.daily_quota, now=now
        )
        limits = rate_limit_headers(decisions)
        for decision in decisions:
            if not decision.allowed:
                labelled(RATE_LIMITED, route.prefix, decision.policy.name).inc()
                raise TooManyRequests(
                    f"Over the {decision.policy.name} limit; try again in "
                    f"{decision.retry_after} s.",
                    headers=limits,
                )
        outgoing = self._headers(scope, headers, chain, self._signed(caller.principal, now))
        upstream = await self._forward(scope, receive, headers, route, outgoing)
        extra = [(k.lower().encode(), v.encode()) for k, v in limits.items()]
        head, content = await _head(upstream, extra)
        return upstream, head, content

    def _signed(self, principal: Principal, now: float) -> str:
        """The principal's header value, signed afresh every few seconds."""
        cached = self._signatures.get(principal)
        if cached is not None and now - cached[0] < _SIGNATURE_REUSE:
            return cached[1]
        value = sign_principal(principal, self.secret, now=now)
        if len(self._signatures) >= _SIGNATURES:
            self._signatures.clear()
        self._signatures[principal] = (now, value)
        return value

    @staticmethod
    def _headers(
        scope: Scope, headers: Headers, chain: list[str], signed_principal: str
    ) -> list[tuple[bytes, bytes]]:
        raw: list[tuple[bytes, bytes]] = scope["headers"]
        drop = _hop_by_hop(raw) | _REPLACED
        forwarded = [(k, v) for k, v in raw if k not in drop]
        proto, host = scope.get("scheme", "http"), headers.get("host", "")
        if len(chain) > 1:  # came through a trusted proxy: believe what it says
            proto = headers.get("x-forwarded-proto", proto)
            host = headers.get("x-forwarded-host", host)
        forwarded += [
            (b"x-request-id", (request_id_var.get() or "").encode()),
            (b"x-forwarded-for", ", ".join(chain).encode("latin-1")),
            (b"x-forwarded-proto", proto.encode("latin-1")),
            (b"x-forwarded-host", host.encode("latin-1")),
            (PRINCIPAL_HEADER.lower().encode(), signed_principal.encode()),
        ]
        return forwarded

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        headers: Headers,
        route: Route,
        outgoing: list[tuple[bytes, bytes]],
    ) -> UpstreamResponse:
        method: str = scope["method"]
        has_body = "content-length" in headers or "transfer-encoding" in headers
        body = _Body(receive) if has_body else None
        retryable = method in IDEMPOTENT or "idempotency-key" in headers
        # The path as the client sent it: decoding it would turn %2F into a separator.
        target: bytes = scope.get("raw_path") or scope["path"].encode()
        if query := query_without_key(scope.get("query_string", b"")):
            target += b"?" + query
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
                return await self._send(replica, route, method, target, outgoing, body)
            except ConnectFailed as exc:
                if isinstance(exc, ConnectTimedOut):
                    failed = GatewayTimeout("The service could not be reached in time.")
                else:
                    failed = BadGateway("The service could not be reached.")
                never_sent = body is None or not body.started
                if retryable and never_sent and len(tried) <= self.retries:
                    continue
                raise failed from exc

    @staticmethod
    async def _send(
        replica: Replica,
        route: Route,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: _Body | None,
    ) -> UpstreamResponse:
        """One call to one replica, its verdict given to the replica's breaker."""
        started = time.perf_counter()
        try:
            upstream = await replica.client.forward(method, target, headers, body, route.timeouts)
        except UpstreamError as exc:
            if body is not None and body.error is not None:
                replica.breaker.release()  # our side stopped it: no verdict on the replica
                raise body.error from exc
            if isinstance(exc, PoolFull):  # our own pool is full: not the replica's fault
                replica.breaker.release()
                raise GatewayTimeout("Too many requests in flight to the service.") from exc
            replica.breaker.failure()
            if isinstance(exc, ConnectFailed):
                labelled(UPSTREAM_REQUESTS, replica.url, "connect_error").inc()
                raise  # the caller may retry elsewhere
            if isinstance(exc, ReadTimedOut):
                labelled(UPSTREAM_REQUESTS, replica.url, "timeout").inc()
                raise GatewayTimeout("The service did not answer in time.") from exc
            labelled(UPSTREAM_REQUESTS, replica.url, "error").inc()
            raise BadGateway("The service closed the connection without answering.") from exc
        except BaseException:
            replica.breaker.release()  # cancelled (the caller left): no verdict
            raise
        replica.breaker.success()
        labelled(UPSTREAM_REQUESTS, replica.url, str(upstream.status)).inc()
        labelled(UPSTREAM_DURATION, replica.url).observe(time.perf_counter() - started)
        return upstream


async def _head(
    upstream: UpstreamResponse, extra: list[tuple[bytes, bytes]]
) -> tuple[list[tuple[bytes, bytes]], bytes | None]:
    """The upstream's headers as they came (less hop-by-hop ones) plus ``extra``, and its
    body when it is small and of known length (None: it is to be streamed)."""
    # Raw pairs keep repeated headers (Set-Cookie, Link) apart.
    drop = _hop_by_hop(upstream.headers) | _SERVER_SET
    kept = [(k.lower(), v) for k, v in upstream.headers if k.lower() not in drop]
    kept += extra
    length = next((v for k, v in kept if k == b"content-length"), b"")
    if not (length.isdigit() and int(length) <= _SMALL_BODY):
        return kept, None
    try:
        return kept, await upstream.read()
    except UpstreamError as exc:
        raise BadGateway("The service broke off its answer.") from exc
