"""HTTP over the network on aiohttp's connections: the gateway's proxy uses a session from
:func:`new_session` as it is; calls between services use it under httpx's API through
:class:`AiohttpTransport`. httpx's own pool cost 1.6-1.8 ms of CPU a request (it walks every
connection, each with a poll, on every request), aiohttp's 0.3-0.5, measured on the same
upstream.

aiohttp's errors become httpx's, by what happened: :class:`httpx.ConnectError` and
:class:`httpx.ConnectTimeout` only when the request never reached the server (safe to send
again), :class:`httpx.ReadTimeout` when the answer was too slow, a
:class:`httpx.RemoteProtocolError` or :class:`httpx.ReadError` when the server broke the
exchange after the request went out. httpx's write timeout has no aiohttp counterpart.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import aiohttp
import httpx
from yarl import URL


def new_session(*, max_connections: int, keepalive_seconds: float) -> aiohttp.ClientSession:
    """A keep-alive pool of up to ``max_connections``, an idle connection closed after
    ``keepalive_seconds`` (keep it below the server's own idle timeout, uvicorn's 5 s, so a
    request never meets a connection the server is closing). No cookies kept between callers
    (one session serves every caller, and users), bodies as they come (httpx decodes them),
    no headers added (the caller's Accept, User-Agent… go as they are). aiohttp turns Nagle
    off on each connection: small requests never wait for a delayed ACK. Make it in the
    event loop that will use it: aiohttp binds a session to one."""
    connector = aiohttp.TCPConnector(
        limit=max_connections,
        limit_per_host=0,
        keepalive_timeout=keepalive_seconds,
        use_dns_cache=True,
    )
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=("Accept", "Accept-Encoding", "Content-Type", "User-Agent"),
        timeout=aiohttp.ClientTimeout(total=None),
    )


class AiohttpTransport(httpx.AsyncBaseTransport):
    """httpx's transport API on a :func:`new_session` session, made on first use."""

    def __init__(self, *, max_connections: int, keepalive_seconds: float) -> None:
        self._max_connections = max_connections
        self._keepalive = keepalive_seconds
        self._session: aiohttp.ClientSession | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._session is None:
            self._session = new_session(
                max_connections=self._max_connections, keepalive_seconds=self._keepalive
            )
        timeout = request.extensions.get("timeout", {})
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw]
        data: bytes | httpx.AsyncByteStream | None
        try:
            data = request.content or None
        except httpx.RequestNotRead:  # a streamed body: aiohttp frames it itself
            data = request.stream  # type: ignore[assignment]  # an async iterable of bytes
            headers = [(k, v) for k, v in headers if k.lower() != "transfer-encoding"]
        with _httpx_errors(request):
            response = await self._session.request(
                request.method,
                URL(str(request.url), encoded=True),
                headers=headers,
                data=data,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=timeout.get("pool"),
                    sock_connect=timeout.get("connect"),
                    sock_read=timeout.get("read"),
                ),
            )
        return httpx.Response(
            response.status,
            headers=list(response.raw_headers),
            stream=_Body(response, request),
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _Body(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _httpx_errors(self._request):
            async for chunk in self._response.content.iter_any():
                yield chunk

    async def aclose(self) -> None:
        # Back to the pool when the body was read to its end; closed otherwise.
        self._response.release()


@contextlib.contextmanager
def _httpx_errors(request: httpx.Request) -> Iterator[None]:
    try:
        yield
    except aiohttp.InvalidURL as exc:  # never sent
        raise httpx.UnsupportedProtocol(str(exc), request=request) from exc
    except aiohttp.ConnectionTimeoutError as exc:
        raise httpx.ConnectTimeout(str(exc), request=request) from exc
    except aiohttp.ClientConnectorError as exc:  # refused, unresolvable: never sent
        raise httpx.ConnectError(str(exc), request=request) from exc
    except (aiohttp.ServerTimeoutError, TimeoutError) as exc:
        raise httpx.ReadTimeout(str(exc), request=request) from exc
    except (
        aiohttp.ServerDisconnectedError,
        aiohttp.ClientPayloadError,
        aiohttp.ClientResponseError,  # an answer that is not HTTP
    ) as exc:
        raise httpx.RemoteProtocolError(str(exc), request=request) from exc
    except aiohttp.ClientError as exc:  # reset, broken pipe…
        raise httpx.ReadError(str(exc), request=request) from exc
