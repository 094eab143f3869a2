"""The video service on PostgreSQL: migrations, job claiming and detections in a schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from c4c.video.app import create_app
from c4c.video.settings import VideoSettings

from .test_api import client_for, finished, upload

pytestmark = pytest.mark.postgres


async def test_jobs_and_detections_on_postgresql(
    tmp_path: Path, test_data: Path, postgres_url: str, postgres_schema: str, eventually: Any
) -> None:
    settings = VideoSettings(
        data_dir=tmp_path,
        database_url=postgres_url,
        database_schema=postgres_schema,
        allowed_hosts=["camera.site.invalid"],  # allowed by name: never resolved
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app), client_for(app) as client:
        job = await finished(
            client, await upload(client, test_data / "video" / "cockatoo.mp4"), eventually
        )
        assert job["status"] == "succeeded", job["reason"]
        listed = (await client.get("/video/v1/detections", params={"job_id": job["id"]})).json()
        assert len(listed["items"]) == job["detections"] > 0
        created = await client.post(
            "/video/v1/streams",
            json={"name": "cam", "url": "rtsp://camera.site.invalid/cam", "start": False},
        )
        assert created.status_code == 201, created.text
        started = await client.post(f"/video/v1/streams/{created.json()['id']}/pause")
        assert started.json()["desired"] == "paused"
        await client.post(f"/video/v1/streams/{created.json()['id']}/stop")
