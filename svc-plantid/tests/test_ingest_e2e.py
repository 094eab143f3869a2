"""End to end with the real ingest service on one in-process bus, as a mobile app works: the
observation is created without photos, its photo uploaded after; plantid identifies it on
``observation.updated``, fetching the photo from ingest's media URL through
``runtime.clients`` (real HTTP, in process), and ingest writes the identification back.
Updates that add no photo do not identify it again; the metrics count each identification."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from c4c.ingest.app import create_app as create_ingest
from c4c.ingest.settings import IngestSettings
from c4c.plantid.app import create_app as create_plantid
from c4c.plantid.consumers import plantid_consumers
from c4c.plantid.settings import PlantidSettings
from c4c.shared.app import run_together
from c4c.shared.bus import CloudEvent, InProcessBus

FOLDERS = ("Helianthus_annuus", "Galanthus_nivalis", "Viola_sp")


@contextlib.asynccontextmanager
async def suite(
    tmp_path: Path, model_cache: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient, InProcessBus]]:
    bus = InProcessBus()
    ingest = create_ingest(IngestSettings(data_dir=tmp_path, outbox_poll_interval=0.05), bus)
    plantid = create_plantid(
        PlantidSettings(
            data_dir=tmp_path,
            model_cache=model_cache,
            outbox_poll_interval=0.05,
            log_level="WARNING",
        ),
        bus,
    )
    async with (
        run_together([ingest.state.runtime, plantid.state.runtime], bus, timeout=10),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=ingest), base_url="http://ingest", timeout=120
        ) as to_ingest,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=plantid), base_url="http://plantid", timeout=120
        ) as to_plantid,
    ):
        yield to_ingest, to_plantid, bus


async def test_a_photo_uploaded_after_creation_is_identified_once(
    tmp_path: Path,
    model_cache: Path,
    plants: Path,
    eventually: Callable[..., Any],
    metric: Callable[..., Awaitable[float]],
) -> None:
    async with suite(tmp_path, model_cache) as (ingest, plantid, bus):
        identified: list[CloudEvent] = []
        updates: list[CloudEvent] = []

        async def collect(event: CloudEvent) -> None:
            (identified if event.type == "observation.identified" else updates).append(event)

        await bus.subscribe("test.e2e", ["observation.identified", "observation.updated"], collect)
        await plantid.post("/plantid/v1/projects", json={"id": "meadow", "title": "Meadow"})
        for folder in FOLDERS:
            photos = sorted((plants / folder).glob("*.jpg"))[:4]
            enrolled = await plantid.post(
                "/plantid/v1/projects/meadow/references",
                data={"species": folder.replace("_", " ").replace(" sp", " sp.")},
                files=[("images", (p.name, p.read_bytes(), "image/jpeg")) for p in photos],
            )
            assert enrolled.status_code == 201, enrolled.text
        counted = "c4c_plantid_identifications_total"
        before = await metric(plantid, counted, project="meadow", outcome="identified")

        created = await ingest.post(
            "/ingest/v1/observations",
            json={
                "datasetID": "meadow",
                "recordedBy": "user-1",
                "eventDate": "2024-03-03T10:15:00+01:00",
                "decimalLatitude": 51.5,
                "decimalLongitude": -0.12,
                "license": "CC-BY",
            },
        )
        assert created.status_code == 201, created.text
        location = created.headers["Location"]
        observation_id = created.json()["id"]
        photo = sorted((plants / "Galanthus_nivalis").glob("*.jpg"))[10].read_bytes()
        uploaded = await ingest.post(
            f"{location}/media", content=photo, headers={"content-type": "image/jpeg"}
        )
        assert uploaded.status_code == 201, uploaded.text
        assert uploaded.json()["url"].startswith("http://127.0.0.1:8000/ingest/v1/media/")

        async def written_back() -> bool:
            body = (await ingest.get(location)).json()
            return any(
                i.get("scientificName") == "Galanthus nivalis"
                for i in body.get("identifications") or []
            )

        await eventually(written_back, timeout=60)
        assert len(identified) == 1
        data = identified[0].data
        assert data["observation_id"] == observation_id
        assert (data["project"], data["rejected"]) == ("meadow", False)
        assert data["candidates"][0]["scientificName"] == "Galanthus nivalis"

        # An update without a new photo leaves the identification as it is.
        current = await ingest.get(location)
        patched = await ingest.patch(
            location,
            content=b'{"eventDate": "2024-03-04T09:00:00+01:00"}',
            headers={
                "content-type": "application/merge-patch+json",
                "If-Match": current.headers["ETag"],
            },
        )
        assert patched.status_code == 200, patched.text
        await eventually(lambda: any("eventDate" in u.data["changed"] for u in updates))
        assert await bus.drain(10)
        assert len(identified) == 1
        assert await metric(plantid, counted, project="meadow", outcome="identified") == before + 1


async def test_an_observation_no_database_could_store_is_not_identified(
    tmp_path: Path, model_cache: Path
) -> None:
    settings = PlantidSettings(
        data_dir=tmp_path, model_cache=model_cache, default_project="meadow", log_level="WARNING"
    )
    app = create_plantid(settings)
    runtime = app.state.runtime
    fetched: list[str] = []

    async def fetch(url: str) -> bytes:
        fetched.append(url)
        raise AssertionError("its photos are not worth fetching")

    consumers = plantid_consumers(runtime, app.state.plantid_engine, settings, fetch)
    async with app.router.lifespan_context(app):
        for observation in (
            {"id": "obs\x00-1", "datasetID": "meadow"},
            {"id": "obs-2", "datasetID": "mea\x00dow"},
        ):
            media = [{"id": "m", "url": "http://ingest/ingest/v1/media/m", "format": "image/jpeg"}]
            event = runtime.event("observation.created", observation | {"media": media})
            await consumers["observation.created"](event)
    assert fetched == []
