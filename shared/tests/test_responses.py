"""``FileResponse`` answers as Starlette's does (whole, ranges, HEAD, If-Range), for a small
file read in one worker-thread trip and a large one streamed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio.to_thread
import httpx
import pytest
from fastapi import FastAPI
from starlette import responses

from c4c.shared.responses import SMALL_FILE, FileResponse

SIZES = {"small": 1000, "large": SMALL_FILE + 70_000}
REQUESTS: list[dict[str, str]] = [
    {},
    {"Range": "bytes=100-199"},
    {"Range": "bytes=-50"},
    {"Range": "bytes=900-"},
    {"Range": "bytes=0-9, 20-29"},
    {"Range": "bytes=100-199", "If-Range": '"not-this-one"'},
]


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = FastAPI()
    for name, size in SIZES.items():
        file = tmp_path / name
        file.write_bytes(bytes(i % 251 for i in range(size)))

    @app.api_route("/ours/{name}", methods=["GET", "HEAD"], response_class=FileResponse)
    async def ours(name: str) -> FileResponse:
        return FileResponse(tmp_path / name, media_type="image/jpeg")

    @app.api_route("/starlette/{name}", methods=["GET", "HEAD"])
    async def starlette(name: str) -> responses.FileResponse:
        return responses.FileResponse(tmp_path / name, media_type="image/jpeg")

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://files.test") as client:
        yield client


def _comparable(response: httpx.Response) -> tuple[Any, ...]:
    headers = dict(response.headers)
    content = response.content
    if "multipart/byteranges" in headers.get("content-type", ""):
        # The boundary is random: compare with it taken out.
        boundary = headers["content-type"].split("boundary=")[1]
        content = content.replace(boundary.encode(), b"")
        headers["content-type"] = headers["content-type"].replace(boundary, "")
        del headers["content-length"]
    return response.status_code, headers, content


@pytest.mark.parametrize("name", sorted(SIZES))
@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("headers", REQUESTS)
async def test_answers_as_starlette_does(
    client: httpx.AsyncClient, name: str, method: str, headers: dict[str, str]
) -> None:
    ours = await client.request(method, f"/ours/{name}", headers=headers)
    theirs = await client.request(method, f"/starlette/{name}", headers=headers)
    assert ours.status_code in (200, 206)
    assert _comparable(ours) == _comparable(theirs)


async def test_a_small_file_takes_one_worker_thread_trip(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    trips = []
    run_sync = anyio.to_thread.run_sync

    async def counted(*args: Any, **kwargs: Any) -> Any:
        trips.append(args[0])
        return await run_sync(*args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counted)
    whole = await client.get("/ours/small")
    part = await client.get("/ours/small", headers={"Range": "bytes=10-19"})
    assert len(whole.content) == SIZES["small"]
    assert part.content == whole.content[10:20]
    assert len(trips) == 2


async def test_a_missing_file_is_an_error_as_in_starlette(client: httpx.AsyncClient) -> None:
    with pytest.raises(RuntimeError, match="does not exist"):
        await client.get("/ours/absent")
