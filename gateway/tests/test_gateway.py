"""The gateway: every installed service embedded behind one front door, and the streaming
reverse proxy it uses for them and for remote upstreams alike."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from c4c.gateway.app import create_app
from c4c.gateway.settings import GatewaySettings
from c4c.shared.context import request_id_var
from c4c.shared.problems import PROBLEM_MEDIA_TYPE

SERVICES = {"/ingest": "ingest", "/quality": "quality", "/video": "video"}
SERVICES |= {"/plantid": "plantid", "/mobis": "mobis"}
FIVE_MB = 5 * 1024 * 1024


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Embedded services read their own settings from the environment: point every one of
    them at tmp_path, and let nothing from the outside (C4C_*, a .env) in."""
    for name in list(os.environ):
        if name.upper().startswith("C4C_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("C4C_DATA_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)


def client_for(app: FastAPI) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://gateway.test")


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["type"]
    assert body["title"]
    return body


# --- embedded mode -------------------------------------------------------------------------


@pytest.fixture
async def embedded(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(GatewaySettings(data_dir=tmp_path))
    async with app.router.lifespan_context(app), client_for(app) as client:
        yield client


async def test_embedded_health_lists_every_service_ready(
    embedded: httpx.AsyncClient, tmp_path: Path
) -> None:
    response = await embedded.get("/health")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ready"
    assert set(body["upstreams"]) == set(SERVICES)
    assert all(probe == {"ready": True, "status": 200} for probe in body["upstreams"].values())
    for name in [*SERVICES.values(), "gateway"]:
        assert (tmp_path / f"{name}.db").is_file(), name


@pytest.mark.parametrize(("prefix", "service"), SERVICES.items())
async def test_embedded_service_health_through_its_prefix(
    embedded: httpx.AsyncClient, prefix: str, service: str
) -> None:
    response = await embedded.get(f"{prefix}/healthz")
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "alive", "service": service}
    ready = await embedded.get(f"{prefix}/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": True, "bus": True}


async def test_embedded_gateway_serves_its_own_operations(embedded: httpx.AsyncClient) -> None:
    response = await embedded.get("/healthz")
    assert response.json() == {"status": "alive", "service": "gateway"}
    assert (await embedded.get("/readyz")).status_code == 200
    openapi = await embedded.get("/openapi.json")
    assert openapi.json()["info"]["title"] == "Cos4Cloud API gateway"


async def test_embedded_unknown_prefix_is_a_404_problem(embedded: httpx.AsyncClient) -> None:
    body = assert_problem(await embedded.get("/nowhere/v1/things"), 404)
    assert body["type"] == "urn:c4c:problem:not-found"
    assert "/nowhere/v1/things" in body["detail"]


async def test_embedded_unknown_route_of_a_service_is_its_404_problem(
    embedded: httpx.AsyncClient,
) -> None:
    body = assert_problem(await embedded.get("/ingest/no-such-route"), 404)
    assert body["instance"] == "/ingest/no-such-route"


class RequestIdsLogged(logging.Handler):
    """The request id in hand when each access-log line is written: the gateway's and the
    embedded service's middleware each write one."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen: list[tuple[str | None, str | None]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append((getattr(record, "path", None), request_id_var.get()))


@pytest.fixture
def access_log(caplog: pytest.LogCaptureFixture) -> Iterator[RequestIdsLogged]:
    caplog.set_level(logging.INFO, logger="c4c.http")
    handler = RequestIdsLogged()
    logger = logging.getLogger("c4c.http")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


async def test_embedded_request_id_reaches_the_service_and_comes_back(
    embedded: httpx.AsyncClient, access_log: RequestIdsLogged
) -> None:
    response = await embedded.get("/quality/healthz", headers={"X-Request-ID": "gw-trace-1"})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "gw-trace-1"
    assert response.headers.get_list("x-request-id") == ["gw-trace-1"]
    ids = [rid for path, rid in access_log.seen if path == "/quality/healthz"]
    assert ids == ["gw-trace-1", "gw-trace-1"]  # the service's line, then the gateway's


async def test_embedded_generated_request_id_is_the_services_too(
    embedded: httpx.AsyncClient, access_log: RequestIdsLogged
) -> None:
    response = await embedded.get("/mobis/healthz")
    generated = response.headers["x-request-id"]
    ids = [rid for path, rid in access_log.seen if path == "/mobis/healthz"]
    assert ids == [generated, generated]


# --- the proxy, against a real HTTP upstream ------------------------------------------------


@pytest.fixture(scope="module")
def big_body() -> bytes:
    return random.Random(20261123).randbytes(FIVE_MB)


def echo_app(big_body: bytes) -> Callable[..., Any]:
    """An upstream that tells what it received, or streams ``big_body`` back."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        if scope["path"] == "/echo/big":
            size = int(parse_qs(scope["query_string"].decode())["size"][0])
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/octet-stream")],
                }
            )
            for start in range(0, size, 64 * 1024):
                chunk = big_body[start : min(start + 64 * 1024, size)]
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        digest, length = hashlib.sha256(), 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            digest.update(message.get("body", b""))
            length += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        answer = {
            "method": scope["method"],
            "path": scope["path"],
            "raw_path": scope["raw_path"].decode("latin-1"),
            "query": scope["query_string"].decode("latin-1"),
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
            "body_sha256": digest.hexdigest(),
            "body_length": length,
        }
        await send(
            {
                "type": "http.response.start",
                "status": 418 if scope["path"] == "/echo/teapot" else 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"set-cookie", b"a=1; Path=/"),
                    (b"set-cookie", b"b=2; Path=/; HttpOnly"),
                    (b"keep-alive", b"timeout=99"),
                    (b"x-upstream", b"echo"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": json.dumps(answer).encode()})

    return app


@pytest.fixture
async def echo_url(big_body: bytes, eventually: Callable[..., Any]) -> AsyncIterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(echo_app(big_body), lifespan="off", log_config=None, access_log=False)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    await eventually(lambda: server.started or task.done())
    if task.done():
        task.result()  # raises why the server did not start
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@pytest.fixture
async def proxied(tmp_path: Path, echo_url: str) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(GatewaySettings(data_dir=tmp_path, upstreams={"/echo": [echo_url]}))
    async with app.router.lifespan_context(app), client_for(app) as client:
        yield client


def received_headers(response: httpx.Response) -> dict[str, list[str]]:
    headers: dict[str, list[str]] = {}
    for name, value in response.json()["headers"]:
        headers.setdefault(name, []).append(value)
    return headers


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_proxy_forwards_method_path_and_query(
    proxied: httpx.AsyncClient, method: str
) -> None:
    response = await proxied.request(method, "/echo/a/b?x=1&y=%C3%A9&y=2&empty=")
    assert response.status_code == 200, response.text
    assert response.headers["x-upstream"] == "echo"
    answer = response.json()
    assert answer["method"] == method
    assert answer["path"] == "/echo/a/b"
    assert answer["query"] == "x=1&y=%C3%A9&y=2&empty="


async def test_proxy_passes_the_upstreams_status_through(proxied: httpx.AsyncClient) -> None:
    response = await proxied.get("/echo/teapot")
    assert response.status_code == 418
    assert response.json()["path"] == "/echo/teapot"


async def test_proxy_streams_a_large_request_body_intact(
    proxied: httpx.AsyncClient, big_body: bytes
) -> None:
    response = await proxied.post("/echo/upload", content=big_body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["body_length"] == FIVE_MB
    assert answer["body_sha256"] == hashlib.sha256(big_body).hexdigest()


async def test_proxy_streams_a_large_chunked_request_body_intact(
    proxied: httpx.AsyncClient, big_body: bytes
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(big_body), 100_000):
            yield big_body[start : start + 100_000]

    response = await proxied.put("/echo/upload", content=chunks())
    assert response.request.headers["transfer-encoding"] == "chunked"
    answer = response.json()
    assert answer["body_length"] == FIVE_MB
    assert answer["body_sha256"] == hashlib.sha256(big_body).hexdigest()


async def test_proxy_streams_a_large_response_body_intact(
    proxied: httpx.AsyncClient, big_body: bytes
) -> None:
    async with proxied.stream("GET", f"/echo/big?size={FIVE_MB}") as response:
        assert response.status_code == 200
        digest, length = hashlib.sha256(), 0
        async for chunk in response.aiter_bytes():
            digest.update(chunk)
            length += len(chunk)
    assert length == FIVE_MB
    assert digest.hexdigest() == hashlib.sha256(big_body).hexdigest()


async def test_proxy_drops_hop_by_hop_request_headers(
    proxied: httpx.AsyncClient, echo_url: str
) -> None:
    response = await proxied.get(
        "/echo/headers",
        headers={
            "Connection": "close",
            "Keep-Alive": "timeout=5, max=100",
            "TE": "trailers",
            "Trailer": "X-Checksum",
            "Upgrade": "h2c",
            "Proxy-Authorization": "Basic Zm9vOmJhcg==",
            "X-Kept": "yes",
        },
    )
    received = received_headers(response)
    for hop in ("keep-alive", "te", "trailer", "upgrade", "proxy-authorization"):
        assert hop not in received, hop
    # The proxy's own client speaks keep-alive to the upstream; the caller's "close" stays out.
    assert "close" not in ",".join(received.get("connection", [])).lower()
    assert received["x-kept"] == ["yes"]
    assert received["host"] == [echo_url.removeprefix("http://")]  # the upstream's, not ours


async def test_proxy_drops_headers_named_in_connection(proxied: httpx.AsyncClient) -> None:
    response = await proxied.get(
        "/echo/headers", headers={"Connection": "X-Hop-Secret", "X-Hop-Secret": "internal"}
    )
    assert "x-hop-secret" not in received_headers(response)


async def test_proxy_drops_hop_by_hop_response_headers(proxied: httpx.AsyncClient) -> None:
    response = await proxied.get("/echo/headers")
    assert "keep-alive" not in response.headers
    assert response.headers["x-upstream"] == "echo"


async def test_proxy_keeps_repeated_set_cookie_headers_apart(proxied: httpx.AsyncClient) -> None:
    response = await proxied.get("/echo/cookies")
    assert response.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/; HttpOnly"]
    assert set(response.cookies.keys()) == {"a", "b"}


async def test_proxy_sets_forwarding_headers(proxied: httpx.AsyncClient) -> None:
    response = await proxied.get("/echo/who")
    received = received_headers(response)
    assert received["x-forwarded-for"] == ["127.0.0.1"]
    assert received["x-forwarded-proto"] == ["http"]
    assert received["x-forwarded-host"] == ["gateway.test"]


async def test_proxy_appends_to_a_forwarded_for_chain(proxied: httpx.AsyncClient) -> None:
    response = await proxied.get(
        "/echo/who",
        headers={"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"},
    )
    received = received_headers(response)
    assert received["x-forwarded-for"] == ["203.0.113.7, 127.0.0.1"]
    assert received["x-forwarded-proto"] == ["http"]  # the caller cannot claim TLS


async def test_proxy_passes_the_request_id_to_the_upstream(proxied: httpx.AsyncClient) -> None:
    response = await proxied.get("/echo/id", headers={"X-Request-ID": "trace-through-proxy"})
    assert response.headers.get_list("x-request-id") == ["trace-through-proxy"]
    assert received_headers(response)["x-request-id"] == ["trace-through-proxy"]


async def test_proxy_passes_a_generated_request_id_to_the_upstream(
    proxied: httpx.AsyncClient,
) -> None:
    response = await proxied.get("/echo/id", headers={"X-Request-ID": "not acceptable"})
    generated = response.headers["x-request-id"]
    assert generated != "not acceptable"
    assert received_headers(response)["x-request-id"] == [generated]


@pytest.mark.parametrize("segment", ["a%2Fb", "%2541"])
async def test_proxy_keeps_encoded_path_characters(
    proxied: httpx.AsyncClient, segment: str
) -> None:
    response = await proxied.get(f"/echo/{segment}")
    assert response.status_code == 200, response.text
    assert response.json()["raw_path"] == f"/echo/{segment}"


async def test_proxy_answers_502_when_the_upstream_is_down(tmp_path: Path) -> None:
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
        app = create_app(GatewaySettings(data_dir=tmp_path, upstreams={"/down": [url]}))
        async with app.router.lifespan_context(app), client_for(app) as client:
            response = await client.get("/down/anything", headers={"X-Request-ID": "down-1"})
            health = await client.get("/health")
    body = assert_problem(response, 502)
    assert body["type"] == "urn:c4c:problem:bad-gateway"
    assert body["instance"] == "/down/anything"
    assert response.headers["x-request-id"] == "down-1"
    assert health.status_code == 503
    assert health.json()["upstreams"]["/down"]["ready"] is False
