"""The routing table and the streaming reverse proxy: a request whose path starts with a
prefix goes, body streaming, to one of that prefix's upstreams (round-robin), and the
answer streams back. Embedded services are upstreams too, through an ASGI transport.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence

import httpx
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from c4c.shared.context import request_id_var
from c4c.shared.problems import NotFound, ProblemError

# RFC 9110 §7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)


class BadGateway(ProblemError):
    status, code, title = 502, "bad-gateway", "Bad Gateway"


class GatewayTimeout(ProblemError):
    status, code, title = 504, "gateway-timeout", "Gateway Timeout"


class Upstreams:
    """Prefix → clients of its replicas, tried in turn."""

    def __init__(self, routes: Mapping[str, Sequence[httpx.AsyncClient]]) -> None:
        # One service may serve several prefixes with the same clients; its first is primary.
        self.services: dict[str, Sequence[httpx.AsyncClient]] = {}
        seen: set[tuple[int, ...]] = set()
        for prefix, clients in routes.items():
            identity = tuple(id(c) for c in clients)
            if identity not in seen:
                seen.add(identity)
                self.services[prefix] = clients
        # Longest prefix first, so /plantid/v1 wins over /plantid.
        self._routes = sorted(routes.items(), key=lambda item: len(item[0]), reverse=True)
        self._turns: dict[str, Iterator[httpx.AsyncClient]] = {
            prefix: itertools.cycle(clients) for prefix, clients in self._routes
        }

    def pick(self, path: str) -> tuple[str, httpx.AsyncClient]:
        for prefix, _ in self._routes:
            if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
                return prefix, next(self._turns[prefix])
        raise NotFound(f"No service serves {path}.")

    async def aclose(self) -> None:
        for clients in self.services.values():
            for client in clients:
                await client.aclose()


def _hop_by_hop(headers: Iterable[tuple[str, str]]) -> frozenset[str]:
    """The fixed hop-by-hop names plus those the ``Connection`` header lists."""
    named = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == "connection"
        for token in value.split(",")
    }
    return HOP_BY_HOP | named


def _forward_headers(request: Request) -> list[tuple[str, str]]:
    pairs = request.headers.items()
    drop = _hop_by_hop(pairs)
    headers = [(k, v) for k, v in pairs if k.lower() not in drop]
    client = request.client.host if request.client else ""
    prior = request.headers.get("x-forwarded-for")
    headers = [
        (k, v)
        for k, v in headers
        if not k.lower().startswith("x-forwarded-") and k.lower() != "x-request-id"
    ]
    headers += [
        ("x-request-id", request_id_var.get() or ""),
        ("x-forwarded-for", f"{prior}, {client}" if prior else client),
        ("x-forwarded-proto", request.url.scheme),
        ("x-forwarded-host", request.headers.get("host", "")),
    ]
    return headers


async def forward(request: Request, client: httpx.AsyncClient) -> Response:
    has_body = "content-length" in request.headers or "transfer-encoding" in request.headers
    # The path as the client sent it: decoding it would turn %2F into a separator.
    target = request.scope.get("raw_path") or request.url.path.encode()
    if query := request.scope.get("query_string"):
        target += b"?" + query
    upstream_request = client.build_request(
        request.method,
        httpx.URL(raw_path=target),
        headers=_forward_headers(request),
        content=request.stream() if has_body else None,
    )
    try:
        upstream = await client.send(upstream_request, stream=True)
    except httpx.TimeoutException as exc:
        raise GatewayTimeout("The service did not answer in time.") from exc
    except httpx.TransportError as exc:
        raise BadGateway("The service could not be reached.") from exc
    response = StreamingResponse(
        upstream.aiter_raw(),
        status_code=upstream.status_code,
        background=BackgroundTask(upstream.aclose),
    )
    # Raw pairs keep repeated headers (Set-Cookie, Link) apart.
    answer = upstream.headers.multi_items()
    drop = _hop_by_hop(answer)
    response.raw_headers = [
        (k.encode("latin-1"), v.encode("latin-1")) for k, v in answer if k.lower() not in drop
    ]
    return response
