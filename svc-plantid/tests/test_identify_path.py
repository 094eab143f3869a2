"""The identification path's database work: one short transaction before inference (the
caller's quota and the gallery version), nothing after once the flora is cached; species
metadata kept with the cached flora still follows enrolments in any project."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import event

from c4c.plantid.app import create_app
from c4c.plantid.settings import PlantidSettings

PHOTO = "Viola_sp"
OTHER = "Galanthus_nivalis"


@pytest.fixture
async def plantid(
    tmp_path: Path, model_cache: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """The service in process, with its app."""
    app = create_app(
        PlantidSettings(data_dir=tmp_path, model_cache=model_cache, log_level="WARNING")
    )
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://plantid") as client:
            yield client, app


def _photos(plants: Path, folder: str) -> list[Path]:
    return sorted((plants / folder).glob("*.jpg"))


async def _enrol(
    client: httpx.AsyncClient, project: str, species: str, photos: list[Path], **form: str
) -> dict[str, Any]:
    response = await client.post(
        f"/plantid/v1/projects/{project}/references",
        data={"species": species, **form},
        files=[("images", (p.name, p.read_bytes(), "image/jpeg")) for p in photos],
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def _identify(client: httpx.AsyncClient, project: str, photo: bytes) -> httpx.Response:
    return await client.post(
        f"/v2/identify/{project}?no-reject=true&lang=en",
        files=[("images", ("q.jpg", photo, "image/jpeg")), ("organs", (None, "flower"))],
    )


@contextmanager
def plantid_statements(app: Any) -> Iterator[list[str]]:
    """The SQL statements on plantid's tables run while the block runs (the outbox relay's
    own polling is left out)."""
    seen: list[str] = []
    engine = app.state.runtime.db.engine.sync_engine

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "plantid_" in statement:
            seen.append(" ".join(statement.split()))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


async def test_a_warm_identification_reads_only_quota_and_gallery_version(
    plantid: tuple[httpx.AsyncClient, Any], plants: Path
) -> None:
    client, app = plantid
    await client.post("/plantid/v1/projects", json={"id": "meadow", "title": "Meadow"})
    await _enrol(client, "meadow", "Viola sp.", _photos(plants, PHOTO)[:4])
    await _enrol(client, "meadow", "Galanthus nivalis", _photos(plants, OTHER)[:4])
    query = _photos(plants, PHOTO)[10].read_bytes()
    assert (await _identify(client, "meadow", query)).status_code == 200  # builds the flora

    with plantid_statements(app) as statements:
        response = await _identify(client, "meadow", query)
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["species"]["scientificNameWithoutAuthor"] == ("Viola sp.")
    assert len(statements) == 2, statements
    assert any("plantid_quota" in s for s in statements)
    assert any(s.startswith("SELECT plantid_projects.id") for s in statements)


async def test_an_unknown_project_charges_no_quota(
    plantid: tuple[httpx.AsyncClient, Any], plants: Path
) -> None:
    client, _ = plantid
    response = await _identify(client, "nowhere", _photos(plants, PHOTO)[0].read_bytes())
    assert response.status_code == 404
    quota = (await client.get("/v2/quota")).json()
    assert quota["identify"]["used"] == 0


async def test_species_names_changed_in_one_project_reach_every_project_holding_it(
    plantid: tuple[httpx.AsyncClient, Any], plants: Path
) -> None:
    client, app = plantid
    for project in ("meadow", "garden"):
        await client.post("/plantid/v1/projects", json={"id": project, "title": project})
        await _enrol(client, project, "Viola sp.", _photos(plants, PHOTO)[:4])
        await _enrol(client, project, "Galanthus nivalis", _photos(plants, OTHER)[:4])
    query = _photos(plants, PHOTO)[10].read_bytes()

    def common_names(response: httpx.Response) -> list[str]:
        assert response.status_code == 200, response.text
        (viola,) = [
            r
            for r in response.json()["results"]
            if r["species"]["scientificNameWithoutAuthor"] == "Viola sp."
        ]
        names: list[str] = viola["species"]["commonNames"]
        return names

    assert common_names(await _identify(client, "garden", query)) == []
    # Photos garden holds already (no reference added), names stated anew: garden's
    # cached flora must not keep showing the old names.
    again = await _enrol(
        client, "meadow", "Viola sp.", _photos(plants, PHOTO)[:1], common_names="en:Violet"
    )
    assert again["added"] == []
    assert again["duplicates"] == 1
    assert common_names(await _identify(client, "garden", query)) == ["Violet"]
    floras = [key.project for key in app.state.plantid_engine._floras]
    assert sorted(floras) == ["garden"]  # the older version of garden's flora is gone
