"""The SSRF check of URLs callers hand us: malformed URLs are refusals, never crashes, and
a server that trickles its answer is cut off at the deadline, in the check and in a fetch."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar

import pytest

from c4c.shared.clients import ServiceClients, URLRefused, URLTooSlow
from c4c.shared.settings import ServiceSettings
from c4c.shared.urls import UnsafeURL, URLPolicy, check_url

LOOPBACK = URLPolicy(allowed_hosts=("127.0.0.1",), deadline=0.5)


class FetcherSettings(ServiceSettings):
    service_name: ClassVar[str] = "fetcher"


@pytest.mark.parametrize(
    "url",
    [
        "https://[::1",
        "file:///[::1",
        "http://[zz]/",
        "rtsp://example.org:99999/",
        "http://" + "a" * 64 + ".example.org/",
        "http://a..b/",
        "http://\udcff.org/",
    ],
)
async def test_a_malformed_url_is_refused(tmp_path: Path, url: str) -> None:
    with pytest.raises(UnsafeURL):
        await check_url(url, URLPolicy(file_root=tmp_path))


async def test_a_file_url_with_a_nul_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsafeURL, match="NUL"):
        await check_url("file:///x%00y", URLPolicy(file_root=tmp_path))


@contextlib.asynccontextmanager
async def trickling_server(*, headers: bool) -> AsyncIterator[str]:
    """An HTTP server that sends a byte every 50 ms and never finishes: its header lines, or
    (``headers=False``) its body after whole headers."""
    handlers: set[asyncio.Task[None]] = set()

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n")
        if not headers:
            writer.write(b"Content-Length: 100000\r\n\r\n")
        while True:
            writer.write(b"X-Slow: 1\r\n" if headers else b"x")
            await writer.drain()
            await asyncio.sleep(0.05)  # the trickle under test, not a wait for a condition

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            await trickle(reader, writer)
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with server:
            yield f"http://127.0.0.1:{port}/photo.jpg"
    finally:
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers)


async def test_a_trickling_server_is_refused_at_the_deadline() -> None:
    async with trickling_server(headers=True) as url:
        with pytest.raises(UnsafeURL, match=r"did not answer within 0\.5 s"):
            # The outer bound only keeps a regression from hanging the suite.
            await asyncio.wait_for(check_url(url, LOOPBACK), 10)


@pytest.mark.parametrize("headers", [True, False], ids=["headers", "body"])
async def test_a_fetch_from_a_trickling_server_is_a_422_at_the_deadline(
    tmp_path: Path, headers: bool
) -> None:
    settings = FetcherSettings(
        data_dir=tmp_path, fetch_allowed_hosts=["127.0.0.1"], fetch_deadline=0.5
    )
    clients = ServiceClients(settings)
    try:
        async with trickling_server(headers=headers) as url:
            # Trickled headers hit the check's deadline or the fetch's, whichever comes first:
            # too slow either way, and worth retrying, never "refused".
            with pytest.raises(URLTooSlow) as slow:
                await asyncio.wait_for(clients.fetch(url, max_bytes=10**6), 10)
    finally:
        await clients.aclose()
    assert slow.value.status_code == 422
    assert slow.value.retryable
    assert "within 0.5 s" in str(slow.value.detail)


async def test_a_malformed_url_to_fetch_is_refused(tmp_path: Path) -> None:
    clients = ServiceClients(FetcherSettings(data_dir=tmp_path))
    try:
        with pytest.raises(URLRefused):
            await clients.fetch("https://[::1", max_bytes=1000)
    finally:
        await clients.aclose()
