"""Hostile input found by a fuzz sweep: a 4xx problem, never a 500 or a plain-text answer;
times carry their UTC offset; an upload whose job cannot be stored leaves no file. On
SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from c4c.video.app import create_app
from c4c.video.settings import VideoSettings

from .test_api import client_for, problem

STREAM = {"name": "cam", "url": "rtsp://camera.site.invalid/cam", "start": False}


@pytest.fixture
async def app(tmp_path: Path, database: dict[str, str]) -> AsyncIterator[FastAPI]:
    settings = VideoSettings(
        data_dir=tmp_path,
        log_format="text",
        allowed_hosts=["camera.site.invalid"],  # allowed by name: never resolved
        **database,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(app) as client:
        yield client


async def test_a_stream_body_over_the_json_limit_is_a_413_problem(
    client: httpx.AsyncClient,
) -> None:
    big = {**STREAM, "name": "x" * 400_000}
    problem(await client.post("/video/v1/streams", json=big), 413)
    created = await client.post("/video/v1/streams", json=STREAM)
    assert created.status_code == 201, created.text
    problem(await client.patch(f"/video/v1/streams/{created.json()['id']}", json=big), 413)


async def test_times_are_answered_in_utc_with_their_offset(
    client: httpx.AsyncClient, test_data: Path
) -> None:
    def aware(body: dict[str, Any], *fields: str) -> None:
        for field in fields:
            assert body[field].endswith(("Z", "+00:00")), (field, body[field])

    created = (await client.post("/video/v1/streams", json=STREAM)).json()
    stream = (await client.get(f"/video/v1/streams/{created['id']}")).json()
    aware(stream, "created_at", "updated_at")
    uploaded = await client.post(
        "/video/v1/jobs", content=b"\x00" * 64, headers={"content-type": "video/mp4"}
    )
    assert uploaded.status_code == 202, uploaded.text
    job = (await client.get(f"/video/v1/jobs/{uploaded.json()['id']}")).json()
    aware(job, "created_at")


async def test_an_upload_whose_job_cannot_be_stored_leaves_no_file(
    app: FastAPI, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    async with app.state.runtime.db.engine.begin() as connection:
        await connection.execute(text("DROP TABLE video_detections"))
        await connection.execute(text("DROP TABLE video_jobs"))
    response = await client.post(
        "/video/v1/jobs", content=b"\x00" * 4096, headers={"content-type": "video/mp4"}
    )
    assert response.status_code >= 500
    assert list((tmp_path / "media" / "video" / "uploads").iterdir()) == []
