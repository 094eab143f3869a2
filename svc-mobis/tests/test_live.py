"""The live stream over real HTTP (httpx's ASGI transport would buffer it): a score event
for my observation arrives on my stream within a second, other users' never do, and
Last-Event-ID resumes after the last event seen."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from c4c.mobis.settings import MobisSettings
from c4c.shared.auth import PRINCIPAL_HEADER, Principal, ensure_principal_secret, sign_principal
from c4c.shared.bus import new_event


@pytest.fixture
async def served(app: FastAPI, eventually: Any) -> AsyncIterator[str]:
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    await eventually(lambda: server.started)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task


def as_user(settings: MobisSettings, user_id: str) -> dict[str, str]:
    principal = Principal("user", user_id, scopes=frozenset({"mobis"}))
    return {PRINCIPAL_HEADER: sign_principal(principal, ensure_principal_secret(settings))}


async def events(url: str, headers: dict[str, str], count: int) -> list[tuple[str, dict[str, Any]]]:
    received: list[tuple[str, dict[str, Any]]] = []
    async with (
        httpx.AsyncClient(base_url=url, timeout=10) as client,
        client.stream("GET", "/mobis/v1/me/events", headers=headers) as stream,
    ):
        assert stream.headers["content-type"].startswith("text/event-stream")
        kind = ""
        async for line in stream.aiter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                received.append((kind, json.loads(line.removeprefix("data: "))))
                if len(received) == count:
                    return received
    return received


async def test_my_scores_arrive_live_and_resume_after_the_last_seen(
    app: FastAPI,
    served: str,
    settings: MobisSettings,
    signed_up: Callable[..., Any],
    anonymous: httpx.AsyncClient,
    observation: Callable[..., dict[str, Any]],
) -> None:
    alice, alice_headers = await signed_up("pa@example.org")
    bob, _ = await signed_up("qu@example.org")
    ids = [str(uuid.uuid4()) for _ in range(2)]
    items = [
        {"id": i, "createdAt": "2024-05-03T08:15:00Z", "observation": observation()} for i in ids
    ]
    synced = await anonymous.post(
        "/mobis/v1/sync", json={"observations": items}, headers=alice_headers
    )
    assert synced.status_code == 200, synced.text

    alice_stream = asyncio.create_task(events(served, as_user(settings, alice), 1))
    bob_stream = asyncio.create_task(events(served, as_user(settings, bob), 1))
    await asyncio.sleep(0)  # both connected before the event (a stream replays anyway)
    score = {"observation_id": ids[0], "score": 80, "grade": "research", "flags": []}
    started = asyncio.get_running_loop().time()
    await app.state.runtime.bus.publish(new_event("quality", "observation.scored", score))
    [(kind, data)] = await asyncio.wait_for(alice_stream, timeout=5)
    assert asyncio.get_running_loop().time() - started < 1.0
    assert kind == "scored"
    assert data["observationId"] == ids[0]
    assert data["data"]["grade"] == "research"
    await asyncio.sleep(0.5)
    assert not bob_stream.done()  # nothing of alice's reaches bob
    bob_stream.cancel()

    second = {"observation_id": ids[1], "score": 10, "grade": "casual", "flags": []}
    await app.state.runtime.bus.publish(new_event("quality", "observation.scored", second))
    resumed = await asyncio.wait_for(
        events(served, as_user(settings, alice) | {"Last-Event-ID": str(data["id"])}, 1), 5
    )
    assert [d["observationId"] for _, d in resumed] == [ids[1]]
