"""HTTP calls from one service to another: services never import each other, they meet over
HTTP and the bus.

``runtime.clients.client("ingest")`` is an ``httpx.AsyncClient`` rooted at the ingest service:
in embedded mode an in-process ASGI transport (wired by :func:`c4c.shared.app.run_together`),
in distributed mode the URL named in ``C4C_SERVICE_URLS``. Each request carries a service
principal signed with the suite's principal secret, so a service that only accepts calls
through the gateway accepts it too, and the request id of the work in hand.

``runtime.clients.fetch(url, max_bytes=...)`` gets media an event points at: a URL under the
suite's public URL (the gateway, e.g. ingest's media URLs) goes straight to the owning service,
found by the URL's first path segment (``/ingest/...`` → ``ingest``); any other URL only when
it passes the SSRF policy of :mod:`c4c.shared.urls` (public addresses only).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Generator, Mapping
from http.cookiejar import CookieJar, DefaultCookiePolicy
from urllib.parse import urlsplit

import httpx
from starlette.types import ASGIApp

from c4c.shared.aiohttp_transport import AiohttpTransport
from c4c.shared.asgi import StreamingASGITransport
from c4c.shared.auth import PRINCIPAL_HEADER, Principal, principal_secret, sign_principal
from c4c.shared.context import REQUEST_ID_HEADER, request_id_var
from c4c.shared.problems import BodyTooLarge, ProblemError
from c4c.shared.settings import ServiceSettings
from c4c.shared.urls import (
    HTTP_SCHEMES,
    UnsafeURL,
    URLPolicy,
    URLTimedOut,
    check_url,
    split_url,
)

MAX_CONNECTIONS, KEEPALIVE_SECONDS = 100, 4.0
"""Connections to another service: an idle one is let go before the server's keep-alive
(uvicorn: 5 s) ends it, so a request never goes out on a connection the server is closing at
that moment."""


class ServiceUnreachable(ProblemError):
    status, code, title = 503, "service-unreachable", "Service not reachable"


class URLRefused(ProblemError):
    status, code, title = 422, "url-refused", "URL refused"


class FetchFailed(ProblemError):
    """The server behind a URL failed. ``retryable`` when trying again later may help (it
    was unreachable, or answered 5xx or 429), so a consumer lets the bus retry the event."""

    status, code, title = 502, "fetch-failed", "Fetching the URL failed"

    def __init__(self, detail: str, *, retryable: bool) -> None:
        super().__init__(detail)
        self.retryable = retryable


class URLTooSlow(FetchFailed):
    """The URL did not answer within the fetch deadline. A 422 (the caller gave a URL that
    does not work), not a 504: the slow server is not ours. Retryable, as it may be busy."""

    status, code, title = 422, "url-too-slow", "The URL did not answer in time"


ON_BEHALF_OF = "c4c.on_behalf_of"
"""Request extension naming the :class:`Principal` a call is made for (a user of the calling
service), signed instead of the service, so that the service called charges that user, not
the caller's whole user base (plantid's daily quota): ``extensions={ON_BEHALF_OF: user}``."""


class _SignedPrincipal(httpx.Auth):
    """Signs the calling service as the principal (or the one the call is made for), afresh
    per request (signatures expire)."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.principal = Principal(
            kind="service", id=settings.service_name, scopes=frozenset({"*"})
        )

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        secret = principal_secret(self.settings)
        if secret is not None:  # read per request: in embedded mode the gateway writes it late
            principal = request.extensions.get(ON_BEHALF_OF, self.principal)
            request.headers[PRINCIPAL_HEADER] = sign_principal(principal, secret)
        request_id = request_id_var.get()
        if request_id is not None:
            request.headers.setdefault(REQUEST_ID_HEADER, request_id)
        yield request


class ServiceClients:
    """HTTP clients to the suite's other services, made on first use, closed with the runtime."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self._in_process: dict[str, ASGIApp] = {}
        self._clients: dict[str, httpx.AsyncClient] = {}
        self._external: httpx.AsyncClient | None = None
        self._auth = _SignedPrincipal(settings)
        self._policy = URLPolicy(
            allowed_hosts=tuple(settings.fetch_allowed_hosts),
            timeout=settings.service_timeout,
            deadline=settings.fetch_deadline,
            settings_prefix="C4C_FETCH_",
        )

    def use_in_process(self, apps: Mapping[str, ASGIApp]) -> None:
        """Embedded mode: reach these services (by name) in this process."""
        self._in_process.update(apps)

    def client(self, service: str) -> httpx.AsyncClient:
        """A client whose base URL is the root of ``service``."""
        client = self._clients.get(service)
        if client is None:
            client = self._clients[service] = self._new_client(service)
        return client

    def _new_client(self, service: str) -> httpx.AsyncClient:
        timeout = httpx.Timeout(self.settings.service_timeout)
        app = self._in_process.get(service)
        if app is not None:
            transport = StreamingASGITransport(app)
            return httpx.AsyncClient(
                transport=transport,
                base_url=f"http://{service}.internal",
                timeout=timeout,
                auth=self._auth,
                cookies=_no_cookies(),
            )
        url = self.settings.service_urls.get(service)
        if url is None:
            raise ServiceUnreachable(
                f"No address for the {service} service: set C4C_SERVICE_URLS, e.g. "
                f'{{"{service}": "http://{service}:8000"}}.'
            )
        return httpx.AsyncClient(
            base_url=url,
            timeout=timeout,
            auth=self._auth,
            transport=AiohttpTransport(
                max_connections=MAX_CONNECTIONS, keepalive_seconds=KEEPALIVE_SECONDS
            ),
            cookies=_no_cookies(),
        )

    def _suite_target(self, url: str) -> tuple[str, str] | None:
        """(service, path with query) when ``url`` is under the suite's public URL."""
        base = self.settings.public_url.rstrip("/") + "/"
        if not url.startswith(base):
            return None
        target = url[len(base) - 1 :]
        service = urlsplit(target).path.split("/")[1]
        return service, target

    async def fetch(self, url: str, *, max_bytes: int) -> bytes:
        """The bytes at ``url``, at most ``max_bytes`` of them (413 beyond)."""
        suite_target = self._suite_target(url)
        if suite_target is not None:
            service, target = suite_target
            return await _read(self.client(service), target, url, max_bytes)
        deadline = self.settings.fetch_deadline
        try:
            async with asyncio.timeout(deadline):
                return await self._fetch_external(url, max_bytes)
        except (TimeoutError, URLTimedOut):  # the check's own timer may be the one to fire
            slow = f"{url} did not answer within {deadline:g} s."
            raise URLTooSlow(slow, retryable=True) from None

    async def _fetch_external(self, url: str, max_bytes: int) -> bytes:
        try:
            if split_url(url)[0].scheme.lower() not in HTTP_SCHEMES:
                raise UnsafeURL("only http and https URLs are fetched")
            final = await check_url(url, self._policy, client=self._external_client())
        except URLTimedOut:
            raise
        except UnsafeURL as exc:
            raise URLRefused(f"{url} is refused: {exc}.") from exc
        return await _read(self._external_client(), final, url, max_bytes)

    def _external_client(self) -> httpx.AsyncClient:
        # Redirects are followed by check_url, each hop checked; never blindly here.
        if self._external is None:
            self._external = httpx.AsyncClient(
                follow_redirects=False,
                timeout=httpx.Timeout(self.settings.service_timeout),
                cookies=_no_cookies(),
            )
        return self._external

    async def aclose(self) -> None:
        for client in [*self._clients.values(), *filter(None, [self._external])]:
            await client.aclose()
        self._clients.clear()
        self._external = None


def _no_cookies() -> CookieJar:
    """A jar that takes no cookie: one client serves every caller (users too, see
    :data:`ON_BEHALF_OF`), and httpx would send a cookie one answer set with every later call."""
    return CookieJar(DefaultCookiePolicy(allowed_domains=[]))


async def _read(client: httpx.AsyncClient, target: str, shown: str, max_bytes: int) -> bytes:
    try:
        async with client.stream("GET", target) as response:
            if response.status_code >= 300:
                retryable = response.status_code >= 500 or response.status_code == 429
                raise FetchFailed(f"{shown} answered {response.status_code}.", retryable=retryable)
            return await _bounded(response.aiter_bytes(), shown, max_bytes)
    except httpx.HTTPError as exc:
        raise FetchFailed(f"{shown} could not be fetched: {exc!r}.", retryable=True) from exc


async def _bounded(chunks: AsyncIterator[bytes], shown: str, max_bytes: int) -> bytes:
    data = bytearray()
    async for chunk in chunks:
        data += chunk
        if len(data) > max_bytes:
            raise BodyTooLarge(f"{shown} is larger than {max_bytes} bytes.")
    return bytes(data)
