"""An httpx transport to an ASGI app in this process whose responses stream.

``httpx.ASGITransport`` hands a response over only once the app has sent all of it, so
through it a Server-Sent Events stream shows nothing until it ends, and a large download sits
whole in memory. Here the app runs in its own task and its body chunks pass through a small
queue: the caller reads them as they are sent, and a slow reader holds the app back. Closing
the response tells the app the client went away (``http.disconnect``) and ends its task.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
from starlette.types import ASGIApp, Message, Scope

_CHUNKS_IN_FLIGHT = 16
_GRACE_SECONDS = 1.0  # for an app to return once told that its client went away
_END = object()


class StreamingASGITransport(httpx.AsyncBaseTransport):
    def __init__(
        self,
        app: ASGIApp,
        *,
        raise_app_exceptions: bool = True,
        client: tuple[str, int] = ("127.0.0.1", 123),
    ) -> None:
        self.app = app
        self.raise_app_exceptions = raise_app_exceptions
        self.client = client

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.AsyncByteStream)
        exchange = _Exchange(self.app, _scope(request, self.client), request.stream)
        await exchange.start()
        if exchange.status is None:  # the app failed, or returned, without answering
            if exchange.error is not None and self.raise_app_exceptions:
                raise exchange.error
            return httpx.Response(500, stream=_EmptyStream())
        return httpx.Response(exchange.status, headers=exchange.headers, stream=exchange)


def _scope(request: httpx.Request, client: tuple[str, int]) -> Scope:
    url = request.url
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": request.method,
        "headers": [(k.lower(), v) for k, v in request.headers.raw],
        "scheme": url.scheme,
        "path": url.path,
        "raw_path": url.raw_path.split(b"?")[0],
        "query_string": url.query,
        "server": (url.host, url.port),
        "client": client,
        "root_path": "",
    }


class _EmptyStream(httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        return
        yield b""  # makes this an async generator


class _Exchange(httpx.AsyncByteStream):
    """One request to the app: its task, and its response as a byte stream."""

    def __init__(self, app: ASGIApp, scope: Scope, body: httpx.AsyncByteStream) -> None:
        self.app = app
        self.scope = scope
        self.body = body.__aiter__()
        self.request_complete = False
        self.status: int | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.error: BaseException | None = None
        self.started = asyncio.Event()
        self.disconnected = asyncio.Event()
        self.chunks: asyncio.Queue[object] = asyncio.Queue(_CHUNKS_IN_FLIGHT)
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Run the app until it starts its response (or fails first)."""
        self.task = asyncio.create_task(self._run())
        await self.started.wait()

    async def _run(self) -> None:
        try:
            await self.app(self.scope, self._receive, self._send)
        except Exception as exc:  # handed to the reader, who decides
            self.error = exc
            await self.chunks.put(exc)
        finally:
            self.started.set()
            await self.chunks.put(_END)

    async def _receive(self) -> Message:
        if self.request_complete:
            await self.disconnected.wait()
            return {"type": "http.disconnect"}
        chunk = b""
        while not chunk:  # httpx gives an empty body as one empty chunk
            try:
                chunk = await self.body.__anext__()
            except StopAsyncIteration:
                self.request_complete = True
                return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def _send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = list(message.get("headers", []))
            self.started.set()
        elif message["type"] == "http.response.body":
            chunk = message.get("body", b"")
            if chunk:
                await self.chunks.put(chunk)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            item = await self.chunks.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, bytes)
            yield item

    async def aclose(self) -> None:
        """The client is done: tell the app, let it finish (what it still sends is dropped),
        and stop it if it keeps going."""
        self.disconnected.set()
        task = self.task
        if task is None or task.done():
            return
        drain = asyncio.create_task(self._drain())
        try:
            await asyncio.wait_for(asyncio.shield(task), _GRACE_SECONDS)
        except (TimeoutError, Exception):  # the app's own failure is of no interest now
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        finally:
            drain.cancel()

    async def _drain(self) -> None:
        while True:
            await self.chunks.get()
