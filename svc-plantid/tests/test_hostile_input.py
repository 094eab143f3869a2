"""Hostile input found by a fuzz sweep answers a 4xx problem, never a 500; times carry their
UTC offset; related images point at the URL the caller reached the suite at. On SQLite and
PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from c4c.plantid.app import create_app
from c4c.plantid.settings import PlantidSettings


@pytest.fixture
async def client(
    tmp_path: Path, model_cache: Path, database: dict[str, str]
) -> AsyncIterator[httpx.AsyncClient]:
    (tmp_path / "imports").mkdir()
    settings = PlantidSettings(
        data_dir=tmp_path, model_cache=model_cache, log_level="WARNING", **database
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://plantid") as client:
            created = await client.post("/plantid/v1/projects", json={"id": "meadow", "title": "M"})
            assert created.status_code == 201, created.text
            yield client


def _is_problem(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("source", ["spring\x00", "x" * 300, "a/" + "b" * 256 + "/c"])
async def test_an_unreadable_import_source_is_422(client: httpx.AsyncClient, source: str) -> None:
    response = await client.post(
        "/plantid/v1/projects/meadow/imports", json={"format": "folder", "source": source}
    )
    _is_problem(response, 422)


@pytest.mark.parametrize("offset", ["9223372036854775808", "1000001", "-1"])
async def test_a_references_offset_out_of_range_is_422(
    client: httpx.AsyncClient, offset: str
) -> None:
    response = await client.get("/plantid/v1/projects/meadow/references", params={"offset": offset})
    _is_problem(response, 422)


async def test_times_are_answered_in_utc_with_their_offset(client: httpx.AsyncClient) -> None:
    def aware(moment: Any) -> bool:
        return isinstance(moment, str) and moment.endswith(("Z", "+00:00"))

    project = (await client.get("/plantid/v1/projects/meadow")).json()
    assert aware(project["createdAt"]), project
    assert aware(project["updatedAt"]), project
    listed = (await client.get("/plantid/v1/projects")).json()
    assert all(aware(p["createdAt"]) for p in listed), listed


async def test_related_images_point_at_the_url_the_gateway_was_reached_at(
    client: httpx.AsyncClient, plants: Path
) -> None:
    photos = sorted((plants / "Viola_sp").glob("*.jpg"))
    enrolled = await client.post(
        "/plantid/v1/projects/meadow/references",
        data={"species": "Viola sp.", "organ": "flower"},
        files=[("images", (p.name, p.read_bytes(), "image/jpeg")) for p in photos[:3]],
    )
    assert enrolled.status_code == 201, enrolled.text
    forwarded = {"x-forwarded-host": "suite.example:8443", "x-forwarded-proto": "https"}
    for headers, base in [(forwarded, "https://suite.example:8443/"), ({}, "http://plantid/")]:
        response = await client.post(
            "/v2/identify/meadow?no-reject=true&include-related-images=true",
            files=[("images", ("q.jpg", photos[10].read_bytes(), "image/jpeg"))],
            headers=headers,
        )
        assert response.status_code == 200, response.text
        images = response.json()["results"][0]["images"]
        assert images
        for image in images:
            assert image["url"]["o"].startswith(f"{base}plantid/v1/references/"), image
