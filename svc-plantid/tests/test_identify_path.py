"""The identification path's database work: usually none (the quota charged ahead in blocks,
the gallery version trusted for a while), else a short one run beside inference once the
flora is cached, nothing after; edits through this replica apply at once; species metadata
kept with the cached flora still follows enrolments in any project; quota charged ahead is
never more than the limit and is given back on shutdown."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import event

from c4c.plantid.app import create_app
from c4c.plantid.errors import QuotaExceeded
from c4c.plantid.repository import Repository
from c4c.plantid.service import QuotaLedger, now, utc_day
from c4c.plantid.settings import PlantidSettings

PHOTO = "Viola_sp"
OTHER = "Galanthus_nivalis"


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


async def test_a_warm_identification_runs_no_statement(
    plantid: tuple[httpx.AsyncClient, Any], plants: Path
) -> None:
    client, app = plantid
    await client.post("/plantid/v1/projects", json={"id": "meadow", "title": "Meadow"})
    await _enrol(client, "meadow", "Viola sp.", _photos(plants, PHOTO)[:4])
    await _enrol(client, "meadow", "Galanthus nivalis", _photos(plants, OTHER)[:4])
    query = _photos(plants, PHOTO)[10].read_bytes()
    with plantid_statements(app) as statements:
        assert (await _identify(client, "meadow", query)).status_code == 200  # builds the flora
    assert any("plantid_quota" in s for s in statements)  # a block charged ahead

    with plantid_statements(app) as statements:
        response = await _identify(client, "meadow", query)
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["species"]["scientificNameWithoutAuthor"] == ("Viola sp.")
    assert statements == []


async def test_an_edit_through_this_replica_applies_at_once(
    tmp_path: Path, model_cache: Path, plants: Path
) -> None:
    """However long the gallery version is trusted, an enrolment here is seen by the next
    identification."""
    settings = PlantidSettings(
        data_dir=tmp_path, model_cache=model_cache, gallery_check_seconds=3600, log_level="WARNING"
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://plantid") as client:
            await client.post("/plantid/v1/projects", json={"id": "meadow", "title": "Meadow"})
            await _enrol(client, "meadow", "Viola sp.", _photos(plants, PHOTO)[:4])
            query = _photos(plants, OTHER)[10].read_bytes()
            first = (await _identify(client, "meadow", query)).json()
            assert [r["species"]["scientificNameWithoutAuthor"] for r in first["results"]] == [
                "Viola sp."
            ]
            await _enrol(client, "meadow", "Galanthus nivalis", _photos(plants, OTHER)[:4])
            second = (await _identify(client, "meadow", query)).json()
    assert second["results"][0]["species"]["scientificNameWithoutAuthor"] == "Galanthus nivalis"
    assert second["version"] != first["version"]


async def test_quota_charged_ahead_is_given_back_on_shutdown_and_counts_survive(
    tmp_path: Path, model_cache: Path, plants: Path
) -> None:
    settings = PlantidSettings(
        data_dir=tmp_path,
        model_cache=model_cache,
        daily_quota=100,
        quota_block=4,
        log_level="WARNING",
    )
    query = _photos(plants, PHOTO)[10].read_bytes()

    async def run(identifications: int) -> tuple[list[int], dict[str, Any], int]:
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://plantid") as client:
                if identifications and not (await client.get("/v2/projects")).json():
                    await client.post("/plantid/v1/projects", json={"id": "m", "title": "M"})
                    await _enrol(client, "m", "Viola sp.", _photos(plants, PHOTO)[:4])
                remaining = []
                for _ in range(identifications):
                    response = await _identify(client, "m", query)
                    assert response.status_code == 200, response.text
                    remaining.append(response.json()["remainingIdentificationRequests"])
                quota = (await client.get("/v2/quota")).json()["identify"]
                async with app.state.runtime.db.sessions() as session:
                    stored = await Repository(session).quota_used("anonymous", utc_day(now()))
        return remaining, quota, stored

    remaining, quota, charged = await run(5)
    assert remaining == [99, 98, 97, 96, 95]
    assert quota == {"limit": 100, "used": 5, "remaining": 95}
    assert charged == 8  # two blocks of 4, charged before use
    _, quota, stored = await run(0)  # after a clean shutdown: the 3 unused given back
    assert quota["used"] == stored == 5


async def test_blocks_never_pass_the_limit(tmp_path: Path, model_cache: Path) -> None:
    """Charged ahead in blocks of at most an eighth of what is left (the last ones one by
    one): with another replica charging too, never more than the limit, and every charged
    identification handed out in the end."""
    settings = PlantidSettings(
        data_dir=tmp_path, model_cache=model_cache, daily_quota=20, quota_block=16
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        sessions = app.state.runtime.db.sessions
        mine, other = QuotaLedger(sessions, settings), QuotaLedger(sessions, settings)
        moment = now()
        granted = refused = 0
        for attempt in range(60):
            try:
                await (mine if attempt % 3 else other).charge("k", moment)
                granted += 1
            except QuotaExceeded:
                refused += 1
        async with sessions() as session:
            stored = await Repository(session).quota_used("k", utc_day(moment))
    assert granted == stored == 20
    assert refused == 40


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


@pytest.fixture
async def plantid_quota_1(
    tmp_path: Path, model_cache: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """The service in process with a daily quota of one identification."""
    app = create_app(
        PlantidSettings(
            data_dir=tmp_path, model_cache=model_cache, daily_quota=1, log_level="WARNING"
        )
    )
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://plantid") as client:
            yield client, app


def _count_inferences(app: Any) -> list[int]:
    """The photo counts of the inferences the engine runs from now on (each is handed to an
    inference thread by ``start_embedding``)."""
    engine = app.state.plantid_engine
    inferred: list[int] = []
    start_embedding = engine.start_embedding

    def counting(embedder: Any, photos: Any) -> Any:
        inferred.append(len(photos))
        return start_embedding(embedder, photos)

    engine.start_embedding = counting
    return inferred


async def test_an_unknown_project_is_404_before_a_used_up_quota(
    plantid_quota_1: tuple[httpx.AsyncClient, Any], plants: Path
) -> None:
    client, _ = plantid_quota_1
    await client.post("/plantid/v1/projects", json={"id": "meadow", "title": "Meadow"})
    await _enrol(client, "meadow", "Viola sp.", _photos(plants, PHOTO)[:4])
    query = _photos(plants, PHOTO)[10].read_bytes()
    assert (await _identify(client, "meadow", query)).status_code == 200
    assert (await _identify(client, "meadow", query)).status_code == 429
    assert (await _identify(client, "nowhere", query)).status_code == 404
    assert (await client.get("/v2/quota")).json()["identify"]["used"] == 1


async def test_a_caller_out_of_quota_costs_no_inference(
    plantid_quota_1: tuple[httpx.AsyncClient, Any], plants: Path
) -> None:
    """With the flora cached, inference starts beside the quota's transaction; once the
    caller was refused today, it no longer does."""
    client, app = plantid_quota_1
    inferred = _count_inferences(app)
    await client.post("/plantid/v1/projects", json={"id": "meadow", "title": "Meadow"})
    await _enrol(client, "meadow", "Viola sp.", _photos(plants, PHOTO)[:4])
    query = _photos(plants, PHOTO)[10].read_bytes()
    assert (await _identify(client, "meadow", query)).status_code == 200
    assert len(inferred) == 1
    refused = await _identify(client, "meadow", query)  # inferred beside, result dropped
    assert refused.status_code == 429
    assert len(inferred) == 2
    for _ in range(3):
        assert (await _identify(client, "meadow", query)).status_code == 429
    assert len(inferred) == 2


async def test_a_deleted_project_costs_no_inference_after_its_first_404(
    plantid: tuple[httpx.AsyncClient, Any], plants: Path
) -> None:
    client, app = plantid
    await client.post("/plantid/v1/projects", json={"id": "meadow", "title": "Meadow"})
    await _enrol(client, "meadow", "Viola sp.", _photos(plants, PHOTO)[:4])
    query = _photos(plants, PHOTO)[10].read_bytes()
    assert (await _identify(client, "meadow", query)).status_code == 200  # flora cached
    assert (await client.delete("/plantid/v1/projects/meadow")).status_code == 204
    inferred = _count_inferences(app)
    assert (await _identify(client, "meadow", query)).status_code == 404  # inferred beside
    assert len(inferred) == 1
    assert (await _identify(client, "meadow", query)).status_code == 404
    assert len(inferred) == 1
