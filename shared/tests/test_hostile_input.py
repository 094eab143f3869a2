"""Hostile input answers with a 4xx problem, on SQLite and PostgreSQL alike: NUL characters
and out-of-range numbers, bad Range headers, clients that hang up mid-upload."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from fastapi import APIRouter, FastAPI, Request
from pydantic import BaseModel
from sqlalchemy import text

from c4c.shared.app import ServiceRuntime, create_service_app
from c4c.shared.db import ReadSessionDep, SessionDep
from c4c.shared.problems import PROBLEM_MEDIA_TYPE
from c4c.shared.responses import FileResponse
from c4c.shared.settings import ServiceSettings

FILE_BYTES = b"0123456789"


class TinySettings(ServiceSettings):
    service_name: ClassVar[str] = "tiny"


class Value(BaseModel):
    text: str = ""
    number: int = 0


def tiny_router(file: Path) -> APIRouter:
    router = APIRouter()

    @router.get("/tiny/v1/words/{word}")
    async def find_word(word: str, session: ReadSessionDep, q: str = "") -> dict[str, Any]:
        found = await session.scalar(text("SELECT CAST(:w AS TEXT)"), {"w": word + q})
        return {"word": found}

    @router.post("/tiny/v1/values")
    async def store_value(value: Value, session: SessionDep) -> dict[str, Any]:
        row = await session.execute(
            text("SELECT CAST(:t AS TEXT), CAST(:n AS BIGINT)"),
            {"t": value.text, "n": value.number},
        )
        found_text, found_number = row.one()
        return {"text": found_text, "number": found_number}

    @router.post("/tiny/v1/events", status_code=202)
    async def record_event(value: Value, request: Request, session: SessionDep) -> None:
        # The outbox row is written when the request's transaction commits, after this returns.
        runtime: ServiceRuntime = request.app.state.runtime
        runtime.outbox.add(session, runtime.event("tiny.noted", {}, subject=value.text))

    @router.get("/tiny/v1/broken")
    async def broken(session: SessionDep) -> None:
        await session.execute(text("SELECT * FROM no_such_table"))

    @router.post("/tiny/v1/uploads")
    async def upload(request: Request) -> dict[str, int]:
        return {"size": sum([len(chunk) async for chunk in request.stream()])}

    @router.get("/tiny/v1/file", response_class=FileResponse)
    async def serve_file() -> FileResponse:
        return FileResponse(file, media_type="application/octet-stream")

    return router


def tiny_app(tmp_path: Path, database: dict[str, str]) -> FastAPI:
    file = tmp_path / "file.bin"
    file.write_bytes(FILE_BYTES)
    settings = TinySettings(data_dir=tmp_path, outbox_poll_interval=60, **database)
    return create_service_app(
        settings,
        title="Tiny",
        description="A service made up for hostile-input tests.",
        version="0.0.1",
        prefixes=("/tiny",),
        routers=[tiny_router(file)],
    )


@pytest.fixture
async def app(tmp_path: Path, database: dict[str, str]) -> AsyncIterator[FastAPI]:
    app = tiny_app(tmp_path, database)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://tiny.test") as client:
        yield client


def problem(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    if code is not None:
        assert body["type"] == f"urn:c4c:problem:{code}"
    return body


# --- NUL characters and numbers out of range ----------------------------------------------


@pytest.mark.parametrize(
    "url", ["/tiny/v1/words/a%00b", "/tiny/v1/words/ab?q=%00", "/tiny/v1/words/ab?q=x%00y"]
)
async def test_a_nul_in_the_path_or_query_is_a_400(client: httpx.AsyncClient, url: str) -> None:
    body = problem(await client.get(url), 400, "bad-request")
    assert "NUL" in body["detail"]


async def test_words_without_nul_are_found(client: httpx.AsyncClient) -> None:
    response = await client.get("/tiny/v1/words/a%20b?q=%2500")
    assert response.status_code == 200, response.text
    assert response.json() == {"word": "a b%00"}


@pytest.mark.parametrize(
    "value",
    [{"text": "n\u0000l"}, {"number": 2**70}, {"number": -(2**64)}],
    ids=["nul", "huge", "very-negative"],
)
async def test_a_value_the_database_cannot_store_is_a_422(
    client: httpx.AsyncClient, database: dict[str, str], value: dict[str, Any]
) -> None:
    response = await client.post("/tiny/v1/values", json=value)
    if "text" in value and not database:  # SQLite stores a NUL as it is
        assert response.status_code == 200, response.text
    else:
        problem(response, 422, "invalid-value")
    # The transaction was rolled back and the connection is fine for the next request.
    after = await client.post("/tiny/v1/values", json={"text": "ok", "number": 2**62})
    assert after.status_code == 200, after.text
    assert after.json() == {"text": "ok", "number": 2**62}


async def test_a_nul_refused_when_the_request_commits_is_a_422_and_stores_nothing(
    app: FastAPI, client: httpx.AsyncClient, database: dict[str, str]
) -> None:
    response = await client.post("/tiny/v1/events", json={"text": "n\u0000l"})
    if database:  # PostgreSQL refuses it; SQLite stores the string as it is
        problem(response, 422, "invalid-value")
    else:
        assert response.status_code == 202, response.text
    fine = await client.post("/tiny/v1/events", json={"text": "fine"})
    assert fine.status_code == 202, fine.text
    runtime: ServiceRuntime = app.state.runtime
    async with runtime.db.sessions() as session:
        subjects = (await session.scalars(text("SELECT subject FROM c4c_outbox"))).all()
    assert "fine" in subjects
    assert len(subjects) == (1 if database else 2)


async def test_other_database_errors_stay_500s(client: httpx.AsyncClient) -> None:
    body = problem(await client.get("/tiny/v1/broken"), 500, "internal-error")
    assert "no_such_table" not in str(body)


# --- Range headers on files ---------------------------------------------------------------


@pytest.mark.parametrize("header", ["bytes=5-1", "bytes=abc", "items=0-1", "bytes", "bytes=-"])
async def test_a_malformed_range_is_a_400_problem(client: httpx.AsyncClient, header: str) -> None:
    response = await client.get("/tiny/v1/file", headers={"Range": header})
    problem(response, 400, "malformed-range")


@pytest.mark.parametrize("header", ["bytes=99999999-", "bytes=10-20"])
async def test_a_range_past_the_end_is_a_416_problem(
    client: httpx.AsyncClient, header: str
) -> None:
    response = await client.get("/tiny/v1/file", headers={"Range": header})
    problem(response, 416, "range-not-satisfiable")
    assert response.headers["content-range"] == f"bytes */{len(FILE_BYTES)}"


async def test_a_good_range_is_served(client: httpx.AsyncClient) -> None:
    whole = await client.get("/tiny/v1/file")
    part = await client.get("/tiny/v1/file", headers={"Range": "bytes=2-4"})
    assert whole.content == FILE_BYTES
    assert part.status_code == 206
    assert part.content == FILE_BYTES[2:5]
    assert part.headers["content-range"] == f"bytes 2-4/{len(FILE_BYTES)}"


# --- clients hanging up ---------------------------------------------------------------------


async def test_a_client_gone_mid_upload_is_noted_not_an_error(
    app: FastAPI, caplog: pytest.LogCaptureFixture
) -> None:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/tiny/v1/uploads",
        "raw_path": b"/tiny/v1/uploads",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-length", b"1000")],
        "client": ("127.0.0.1", 50000),
        "server": ("tiny.test", 80),
    }
    messages = [
        {"type": "http.request", "body": b"x" * 100, "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with caplog.at_level(logging.INFO, logger="c4c.http"):
        await app(scope, receive, send)
    assert sent == []  # nobody is there to answer
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(r.getMessage() == "client disconnected" for r in caplog.records)
