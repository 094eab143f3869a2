"""The in-process transport streams: an event stream's first event arrives while the app is
still sending, closing the response disconnects the app, and request bodies stream in."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.types import Message, Receive, Scope, Send

from c4c.shared.asgi import StreamingASGITransport


def client(app: object, **options: bool) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=StreamingASGITransport(app, **options),  # type: ignore[arg-type]
        base_url="http://app.internal",
    )


async def test_chunks_arrive_while_the_app_is_still_sending() -> None:
    first_read = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await first_read.wait()  # buffered transports never get here: deadlock
        await send({"type": "http.response.body", "body": b"data: 2\n\n", "more_body": False})

    async with client(app) as http, http.stream("GET", "/events") as response:
        chunks = response.aiter_bytes()
        first = await asyncio.wait_for(chunks.__anext__(), timeout=5)
        first_read.set()
        rest = [chunk async for chunk in chunks]
    assert response.status_code == 200
    assert first == b"data: 1\n\n"
    assert rest == [b"data: 2\n\n"]


async def test_closing_the_response_disconnects_the_app() -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # the (empty) request body
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"tick", "more_body": True})
        message = await receive()  # waits until the client goes away
        seen.append(message["type"])

    async with client(app) as http:
        async with http.stream("GET", "/events") as response:
            assert await response.aiter_bytes().__anext__() == b"tick"
        # Leaving the block closed the response: the app heard of it and returned.
        assert seen == ["http.disconnect"]


async def test_request_body_streams_in_and_the_answer_comes_back() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        total, parts = 0, 0
        while True:
            message: Message = await receive()
            total += len(message.get("body", b""))
            parts += 1
            if not message.get("more_body"):
                break
        body = f"{scope['method']} {scope['path']}?{scope['query_string'].decode()} {total}"
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": body.encode()})

    async def upload() -> object:
        for _ in range(4):
            yield b"x" * 1000

    async with client(app) as http:
        response = await http.post("/up?a=1", content=upload())
    assert response.status_code == 201
    assert response.text == "POST /up?a=1 4000"


async def test_an_app_failing_before_it_answers() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("boom")

    async with client(app) as http:
        with pytest.raises(RuntimeError, match="boom"):
            await http.get("/")
    async with client(app, raise_app_exceptions=False) as http:
        assert (await http.get("/")).status_code == 500
