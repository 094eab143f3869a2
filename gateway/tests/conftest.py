"""Fixtures of the gateway's tests: a clean environment, real upstreams on loopback (an echo
server), and gateways in front of them with a key to call them with."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from c4c.gateway.app import create_app
from c4c.gateway.settings import GatewaySettings
from c4c.shared.problems import PROBLEM_MEDIA_TYPE

FIVE_MB = 5 * 1024 * 1024
Gateway = tuple[FastAPI, httpx.AsyncClient]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Embedded services read their own settings from the environment: point every one of
    them at tmp_path, and let nothing from the outside (C4C_*, a .env) in."""
    for name in list(os.environ):
        if name.upper().startswith("C4C_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("C4C_DATA_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)


def client_for(app: FastAPI, api_key: str | None = None) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    headers = {"X-API-Key": api_key} if api_key else {}
    return httpx.AsyncClient(transport=transport, base_url="http://gateway.test", headers=headers)


async def new_key(app: FastAPI, scopes: tuple[str, ...] = ("*",), quota: int | None = None) -> str:
    """A key made the way ``python -m c4c.gateway keys create`` makes one."""
    _, secret = await app.state.proxy.identity.keys.create("test", scopes, daily_quota=quota)
    return str(secret)


def _assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["type"]
    assert body["title"]
    return body


@pytest.fixture
def assert_problem() -> Callable[[httpx.Response, int], dict[str, Any]]:
    """``assert_problem(response, status)``: a problem document of that status, returned."""
    return _assert_problem


def _received_headers(response: httpx.Response) -> dict[str, list[str]]:
    headers: dict[str, list[str]] = {}
    for name, value in response.json()["headers"]:
        headers.setdefault(name, []).append(value)
    return headers


@pytest.fixture
def received_headers() -> Callable[[httpx.Response], dict[str, list[str]]]:
    """The request headers the echo upstream says it received."""
    return _received_headers


@pytest.fixture(scope="session")
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
def serve_on_loopback(
    eventually: Callable[..., Any],
) -> Callable[[Any], contextlib.AbstractAsyncContextManager[str]]:
    """``async with serve_on_loopback(asgi_app) as url``: a real HTTP server for the app."""

    @contextlib.asynccontextmanager
    async def serve(app: Any) -> AsyncIterator[str]:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False)
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

    return serve


@pytest.fixture
async def echo_url(big_body: bytes, serve_on_loopback: Callable[[Any], Any]) -> AsyncIterator[str]:
    async with serve_on_loopback(echo_app(big_body)) as url:
        yield url


@pytest.fixture
def open_gateway(
    tmp_path: Path, echo_url: str
) -> Callable[..., contextlib.AbstractAsyncContextManager[Gateway]]:
    """``async with open_gateway(**settings) as (app, client)``: a gateway in front of the
    echo upstream under ``/echo`` (unless ``upstreams`` says otherwise), and a client
    holding a key with every scope."""

    @contextlib.asynccontextmanager
    async def open_(**overrides: Any) -> AsyncIterator[Gateway]:
        settings = {"data_dir": tmp_path, "upstreams": {"/echo": [echo_url]}} | overrides
        app = create_app(GatewaySettings(**settings))
        async with app.router.lifespan_context(app), client_for(app) as client:
            client.headers["X-API-Key"] = await new_key(app)
            yield app, client

    return open_
