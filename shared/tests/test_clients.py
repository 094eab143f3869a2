"""Calls between services: in process (embedded) and over real loopback HTTP (distributed),
signed as the calling service, with media URLs under the suite's public URL routed to the
owning service and every other URL held to the SSRF policy."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response

from c4c.shared.app import create_service_app, run_together
from c4c.shared.auth import Principal, current_principal
from c4c.shared.bus import InProcessBus
from c4c.shared.clients import (
    KEEPALIVE_SECONDS,
    ON_BEHALF_OF,
    FetchFailed,
    ServiceClients,
    ServiceUnreachable,
    URLRefused,
)
from c4c.shared.context import request_id_var
from c4c.shared.problems import BodyTooLarge
from c4c.shared.settings import ServiceSettings

BLOB = bytes(range(256)) * 64
SECRET = "s3cret-shared-by-the-suite"


class AlphaSettings(ServiceSettings):
    service_name: ClassVar[str] = "alpha"


class BetaSettings(ServiceSettings):
    service_name: ClassVar[str] = "beta"


def alpha_router() -> APIRouter:
    router = APIRouter()

    @router.get("/alpha/v1/whoami")
    async def whoami(request: Request) -> dict[str, Any]:
        principal = current_principal(request)
        assert principal is not None  # require_principal refuses calls without one
        return {
            "kind": principal.kind,
            "id": principal.id,
            "request_id": request.headers.get("x-request-id"),
        }

    @router.get("/alpha/v1/blob")
    async def blob() -> Response:
        return Response(BLOB, media_type="application/octet-stream")

    return router


def alpha_app(
    tmp_path: Path, bus: InProcessBus | None = None, *, require_principal: bool = True
) -> FastAPI:
    settings = AlphaSettings(
        data_dir=tmp_path / "alpha", principal_secret=SECRET, require_principal=require_principal
    )
    return create_service_app(
        settings,
        title="alpha",
        description="",
        version="0",
        prefixes=["/alpha"],
        routers=[alpha_router()],
        bus=bus,
    )


def beta_app(tmp_path: Path, bus: InProcessBus | None = None, **settings: Any) -> FastAPI:
    return create_service_app(
        BetaSettings(data_dir=tmp_path / "beta", principal_secret=SECRET, **settings),
        title="beta",
        description="",
        version="0",
        prefixes=["/beta"],
        bus=bus,
    )


@contextlib.asynccontextmanager
async def embedded(tmp_path: Path, **beta_settings: Any) -> AsyncIterator[ServiceClients]:
    bus = InProcessBus()
    alpha, beta = alpha_app(tmp_path, bus), beta_app(tmp_path, bus, **beta_settings)
    runtimes = [alpha.state.runtime, beta.state.runtime]
    async with run_together(runtimes, bus, timeout=5):
        yield beta.state.runtime.clients


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[str]:
    """``app`` over HTTP; its lifespan is the caller's (a second start would make a second
    runtime, whose database connections nobody closes)."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def test_in_process_call_is_signed_as_the_calling_service(tmp_path: Path) -> None:
    async with embedded(tmp_path) as clients:
        token = request_id_var.set("req-42")
        try:
            answer = await clients.client("alpha").get("/alpha/v1/whoami")
        finally:
            request_id_var.reset(token)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"kind": "service", "id": "beta", "request_id": "req-42"}


async def test_a_call_made_for_a_user_is_signed_as_that_user(tmp_path: Path) -> None:
    """MOBIS asking plantid for its user: plantid charges that user's quota, not one shared
    by every user of the app."""
    user = Principal("user", "u-1", scopes=frozenset({"mobis"}))
    async with embedded(tmp_path) as clients:
        client = clients.client("alpha")
        for_user = await client.get("/alpha/v1/whoami", extensions={ON_BEHALF_OF: user})
        own = await client.get("/alpha/v1/whoami")
    assert (for_user.json()["kind"], for_user.json()["id"]) == ("user", "u-1")
    assert (own.json()["kind"], own.json()["id"]) == ("service", "beta")


async def test_media_under_the_public_url_is_fetched_from_the_owning_service(
    tmp_path: Path,
) -> None:
    async with embedded(tmp_path, public_url="https://suite.example.org") as clients:
        data = await clients.fetch("https://suite.example.org/alpha/v1/blob", max_bytes=len(BLOB))
        with pytest.raises(BodyTooLarge):
            await clients.fetch("https://suite.example.org/alpha/v1/blob", max_bytes=len(BLOB) - 1)
        with pytest.raises(FetchFailed) as missing:
            await clients.fetch("https://suite.example.org/alpha/v1/nothing", max_bytes=10)
    assert data == BLOB
    assert missing.value.status_code == 502
    assert not missing.value.retryable


async def test_distributed_call_goes_over_http_to_the_configured_url(tmp_path: Path) -> None:
    alpha = alpha_app(tmp_path)
    async with alpha.router.lifespan_context(alpha), serving(alpha) as url:
        clients = ServiceClients(
            BetaSettings(data_dir=tmp_path, principal_secret=SECRET, service_urls={"alpha": url})
        )
        try:
            answer = await clients.client("alpha").get("/alpha/v1/whoami")
            data = await clients.fetch("http://127.0.0.1:8000/alpha/v1/blob", max_bytes=10**6)
        finally:
            await clients.aclose()
    assert answer.status_code == 200, answer.text
    assert answer.json()["id"] == "beta"
    assert data == BLOB


async def test_calls_over_http_reuse_their_connections(tmp_path: Path) -> None:
    """Thirty calls at once, twice: the second round goes out on the first's connections (httpx's
    own pool kept twenty and opened ten anew for every such round), and an idle connection is
    let go before the server's keep-alive would close it under a request."""
    ports: list[set[int]] = []
    all_in = asyncio.Barrier(30)
    app = FastAPI()

    @app.get("/slow")
    async def slow(request: Request) -> dict[str, int]:
        assert request.client is not None
        ports[-1].add(request.client.port)
        await all_in.wait()  # all thirty in flight at once
        return {"port": request.client.port}

    async with serving(app) as url:
        clients = ServiceClients(
            BetaSettings(data_dir=tmp_path, principal_secret=SECRET, service_urls={"alpha": url})
        )
        try:
            client = clients.client("alpha")
            for _ in range(2):
                ports.append(set())
                answers = await asyncio.gather(*(client.get("/slow") for _ in range(30)))
                assert [a.status_code for a in answers] == [200] * 30
        finally:
            await clients.aclose()
    assert len(ports[0]) == 30
    assert ports[1] <= ports[0]
    assert uvicorn.Config(app).timeout_keep_alive > KEEPALIVE_SECONDS


async def test_an_idle_connection_is_let_go_by_the_caller(tmp_path: Path) -> None:
    """Before the server's keep-alive would end it (this server keeps it for ever: the close
    can only be ours), so no request goes out on a connection the server is closing."""
    closed = asyncio.Event()

    async def keeping(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()  # b"" once the caller closes the connection
        closed.set()

    server = await asyncio.start_server(keeping, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    clients = ServiceClients(
        BetaSettings(data_dir=tmp_path, principal_secret=SECRET, service_urls={"alpha": url})
    )
    try:
        assert (await clients.client("alpha").get("/ok")).text == "ok"
        await asyncio.wait_for(closed.wait(), KEEPALIVE_SECONDS + 5)
    finally:
        await clients.aclose()
        server.close()
        await server.wait_closed()


async def test_transport_failures_are_httpx_errors_that_say_what_happened(
    tmp_path: Path,
) -> None:
    """Refused: never sent, a ConnectError (safe to send again). Cut off in the middle of an
    answer: a RemoteProtocolError (it may have been done). Each names its request."""

    async def half(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(half, "127.0.0.1", 0)
    cut = server.sockets[0].getsockname()[1]
    urls = {"down": f"http://127.0.0.1:{free_port()}", "cut": f"http://127.0.0.1:{cut}"}
    clients = ServiceClients(
        BetaSettings(data_dir=tmp_path, principal_secret=SECRET, service_urls=urls)
    )
    try:
        with pytest.raises(httpx.ConnectError) as refused:
            await clients.client("down").get("/x")
        with pytest.raises(httpx.RemoteProtocolError) as broken:
            await clients.client("cut").get("/x")
    finally:
        await clients.aclose()
        server.close()
        await server.wait_closed()
    assert refused.value.request.url.host == "127.0.0.1"
    assert broken.value.request.url.path == "/x"


async def test_a_call_goes_with_the_headers_it_was_given(tmp_path: Path) -> None:
    """No Content-Type added to a body sent without one (aiohttp's default would)."""
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, str | None]:
        return {"content-type": request.headers.get("content-type")}

    async with serving(app) as url:
        clients = ServiceClients(
            BetaSettings(data_dir=tmp_path, principal_secret=SECRET, service_urls={"alpha": url})
        )
        try:
            bare = await clients.client("alpha").post("/echo", content=b"raw")
            typed = await clients.client("alpha").post("/echo", json={"a": 1})
        finally:
            await clients.aclose()
    assert bare.json() == {"content-type": None}
    assert typed.json() == {"content-type": "application/json"}


async def test_no_cookie_is_kept_between_calls(tmp_path: Path) -> None:
    """One connection pool serves every caller, users too (ON_BEHALF_OF): a cookie one
    answer sets must not go out with the next call."""
    app = FastAPI()

    @app.get("/cookie")
    async def cookie(request: Request) -> Response:
        response = Response(request.headers.get("cookie", ""))
        response.set_cookie("session", "of-someone")
        return response

    async with serving(app) as url:
        clients = ServiceClients(
            BetaSettings(data_dir=tmp_path, principal_secret=SECRET, service_urls={"alpha": url})
        )
        try:
            first = await clients.client("alpha").get("/cookie")
            second = await clients.client("alpha").get("/cookie")
        finally:
            await clients.aclose()
    assert "session=of-someone" in first.headers["set-cookie"]
    assert second.text == ""


async def test_a_service_answering_other_than_http_is_a_transport_error(tmp_path: Path) -> None:
    """A wrong address in C4C_SERVICE_URLS (here a broker's port) fails as httpx fails, which
    callers handle; not with an aiohttp error no caller expects."""

    async def amqp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"AMQP\x00\x00\x09\x01")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(amqp, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    clients = ServiceClients(
        BetaSettings(
            data_dir=tmp_path,
            principal_secret=SECRET,
            service_urls={"alpha": f"http://127.0.0.1:{port}"},
            public_url="http://suite.test",
        )
    )
    try:
        with pytest.raises(httpx.TransportError, match="Bad status line"):
            await clients.client("alpha").get("/")
        with pytest.raises(FetchFailed, match="could not be fetched"):
            await clients.fetch("http://suite.test/alpha/media/1", max_bytes=100)
    finally:
        await clients.aclose()
        server.close()
        await server.wait_closed()


async def test_a_service_without_an_address_is_a_clear_error(tmp_path: Path) -> None:
    clients = ServiceClients(BetaSettings(data_dir=tmp_path))
    with pytest.raises(ServiceUnreachable, match="C4C_SERVICE_URLS"):
        clients.client("ingest")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:5672/",
        "http://169.254.169.254/latest/meta-data/",
        "http://localhost/admin",
        "file:///etc/passwd",
        "ftp://example.org/photo.jpg",
    ],
)
async def test_urls_outside_the_suite_must_be_public(tmp_path: Path, url: str) -> None:
    clients = ServiceClients(BetaSettings(data_dir=tmp_path))
    try:
        with pytest.raises(URLRefused):
            await clients.fetch(url, max_bytes=1000)
    finally:
        await clients.aclose()


async def test_an_allowlisted_host_is_fetched(tmp_path: Path) -> None:
    alpha = alpha_app(tmp_path, require_principal=False)
    async with alpha.router.lifespan_context(alpha), serving(alpha) as url:
        clients = ServiceClients(BetaSettings(data_dir=tmp_path, fetch_allowed_hosts=["127.0.0.1"]))
        try:
            data = await clients.fetch(f"{url}/alpha/v1/blob", max_bytes=10**6)
            with pytest.raises(FetchFailed) as refused:
                await clients.fetch(f"{url}/alpha/v1/nothing", max_bytes=10**6)
        finally:
            await clients.aclose()
    assert data == BLOB
    assert not refused.value.retryable
