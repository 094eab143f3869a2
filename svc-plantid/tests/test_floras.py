"""Own floras: projects, enrolment, listing and deletion (the gallery follows without a
restart), bulk imports from a folder and from a Darwin Core Archive with progress, the
``observation.created`` → ``observation.identified`` consumer, and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from c4c.plantid.app import create_app
from c4c.plantid.engine.embedder import ModelSpec
from c4c.plantid.repository import Repository
from c4c.plantid.service import PlantidService
from c4c.plantid.settings import PlantidSettings
from c4c.shared.bus import CloudEvent, new_event

FOLDERS = ("Helianthus_annuus", "Galanthus_nivalis", "Viola_sp")


@contextlib.asynccontextmanager
async def running(settings: PlantidSettings) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://plantid", timeout=120
        ) as client:
            yield client, app


def _settings(tmp_path: Path, model_cache: Path, **extra: Any) -> PlantidSettings:
    return PlantidSettings(data_dir=tmp_path, model_cache=model_cache, log_level="WARNING", **extra)


async def _enrol(
    client: httpx.AsyncClient, plants: Path, folder: str, count: int = 5
) -> list[dict[str, Any]]:
    photos = sorted((plants / folder).glob("*.jpg"))[:count]
    response = await client.post(
        "/plantid/v1/projects/meadow/references",
        data={"species": folder.replace("_", " ").replace(" sp", " sp."), "organ": "flower"},
        files=[("images", (p.name, p.read_bytes(), "image/jpeg")) for p in photos],
    )
    assert response.status_code == 201, response.text
    added: list[dict[str, Any]] = response.json()["added"]
    return added


async def _best(client: httpx.AsyncClient, photo: bytes) -> str:
    response = await client.post(
        "/v2/identify/meadow?no-reject=true",
        files=[("images", ("q.jpg", photo, "image/jpeg")), ("organs", (None, "flower"))],
    )
    assert response.status_code == 200, response.text
    best: str = response.json()["results"][0]["species"]["scientificNameWithoutAuthor"]
    return best


async def test_enrol_list_delete_and_the_gallery_follows(
    tmp_path: Path, model_cache: Path, plants: Path
) -> None:
    async with running(_settings(tmp_path, model_cache)) as (client, _):
        assert (
            await client.post("/plantid/v1/projects", json={"id": "meadow", "title": "Meadow"})
        ).status_code == 201
        assert (
            await client.post("/plantid/v1/projects", json={"id": "meadow", "title": "Again"})
        ).status_code == 409
        missing = await client.post(
            "/plantid/v1/projects/nowhere/references",
            data={"species": "Viola sp."},
            files=[
                ("images", ("a.jpg", sorted((plants / "Viola_sp").glob("*.jpg"))[0].read_bytes()))
            ],
        )
        assert missing.status_code == 404
        assert missing.headers["content-type"] == "application/problem+json"

        sunflowers = await _enrol(client, plants, "Helianthus_annuus")
        await _enrol(client, plants, "Galanthus_nivalis")
        again = await _enrol(client, plants, "Helianthus_annuus")  # same bytes: not twice
        assert again == []
        listing = (
            await client.get(
                "/plantid/v1/projects/meadow/references", params={"species": "Helianthus annuus"}
            )
        ).json()
        assert listing["total"] == 5
        assert {r["id"] for r in listing["items"]} == {r["id"] for r in sunflowers}
        image = await client.get(sunflowers[0]["imageUrl"])
        assert image.headers["content-type"] == "image/jpeg"

        query = sorted((plants / "Helianthus_annuus").glob("*.jpg"))[10].read_bytes()
        assert await _best(client, query) == "Helianthus annuus"
        before = (await client.get("/plantid/v1/projects/meadow/gallery")).json()
        for reference in sunflowers:
            assert (
                await client.delete(f"/plantid/v1/references/{reference['id']}")
            ).status_code == 204
        after = (await client.get("/plantid/v1/projects/meadow/gallery")).json()
        assert after["version"] != before["version"]
        assert after["species"] == ["Galanthus nivalis"]
        assert await _best(client, query) == "Galanthus nivalis"  # no restart needed

        project = (await client.get("/plantid/v1/projects/meadow")).json()
        assert project["speciesCount"] == 1
        bad = await client.post(
            "/plantid/v1/projects/meadow/references",
            data={"species": "Viola sp."},
            files=[("images", ("a.jpg", b"GIF89a not really", "image/gif"))],
        )
        assert bad.status_code == 415


async def _wait_import(
    client: httpx.AsyncClient, location: str, eventually: Callable[..., Any]
) -> dict[str, Any]:
    state: dict[str, Any] = {}

    async def finished() -> bool:
        state.update((await client.get(location)).json())
        return state["status"] in ("finished", "failed")

    await eventually(finished, timeout=120)
    return state


async def test_bulk_import_of_a_folder_with_species_csv(
    tmp_path: Path, model_cache: Path, plants: Path, eventually: Callable[..., Any]
) -> None:
    source = tmp_path / "imports" / "spring"
    for folder in FOLDERS:
        (source / folder).mkdir(parents=True)
        for photo in sorted((plants / folder).glob("*.jpg"))[:3]:
            shutil.copy(photo, source / folder / photo.name)  # tmp only, never the repository
    (source / "Viola_sp" / "notes.txt").write_text("not a photo")
    (source / "Viola_sp" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (source / "species.csv").write_text(
        "folder,scientificName,family,genus,vernacularName\n"
        "Viola_sp,Viola sp.,Violaceae,Viola,Pansy\n"
    )
    async with running(_settings(tmp_path, model_cache)) as (client, _):
        await client.post("/plantid/v1/projects", json={"id": "meadow", "title": "Meadow"})
        outside = await client.post(
            "/plantid/v1/projects/meadow/imports", json={"format": "folder", "source": "../../etc"}
        )
        assert outside.status_code == 422
        started = await client.post(
            "/plantid/v1/projects/meadow/imports", json={"format": "folder", "source": "spring"}
        )
        assert started.status_code == 202, started.text
        state = await _wait_import(client, started.headers["Location"], eventually)
        assert state["status"] == "finished"
        assert (state["total"], state["done"], state["failed"]) == (10, 9, 1)
        assert state["progress"] == 1.0
        assert state["errors"][0]["item"].endswith("broken.jpg")
        gallery = (await client.get("/plantid/v1/projects/meadow/gallery")).json()
        assert gallery["species"] == ["Galanthus nivalis", "Helianthus annuus", "Viola sp."]
        rerun = await client.post(
            "/plantid/v1/projects/meadow/imports", json={"format": "folder", "source": "spring"}
        )
        state = await _wait_import(client, rerun.headers["Location"], eventually)
        assert (state["done"], state["skipped"]) == (0, 9)  # a re-run resumes, adds nothing twice


async def test_an_import_interrupted_by_a_stop_resumes_at_start(
    tmp_path: Path, model_cache: Path, plants: Path, eventually: Callable[..., Any]
) -> None:
    source = tmp_path / "imports" / "few" / "Viola_sp"
    source.mkdir(parents=True)
    for photo in sorted((plants / "Viola_sp").glob("*.jpg"))[:2]:
        shutil.copy(photo, source / photo.name)
    settings = _settings(tmp_path, model_cache)
    async with running(settings) as (client, app):
        await client.post("/plantid/v1/projects", json={"id": "meadow", "title": "Meadow"})
        async with app.state.runtime.db.sessions() as session, session.begin():
            service = PlantidService(Repository(session), app.state.plantid_engine, settings)
            job = await service.start_import("meadow", "folder", "few")  # accepted, not run
    async with running(settings) as (client, _):
        state = await _wait_import(client, f"/plantid/v1/imports/{job.id}", eventually)
        assert (state["status"], state["done"]) == ("finished", 2)


async def test_bulk_import_of_a_darwin_core_archive(
    tmp_path: Path, model_cache: Path, plants: Path, eventually: Callable[..., Any]
) -> None:
    archive = tmp_path / "imports" / "dwca.zip"
    archive.parent.mkdir(parents=True)
    meta = """<archive xmlns="http://rs.tdwg.org/dwc/text/">
  <core rowType="http://rs.tdwg.org/dwc/terms/Occurrence"
        fieldsTerminatedBy="," ignoreHeaderLines="1">
    <files><location>occurrence.csv</location></files>
    <id index="0"/>
    <field index="1" term="http://rs.tdwg.org/dwc/terms/scientificName"/>
    <field index="2" term="http://rs.tdwg.org/dwc/terms/family"/>
  </core>
  <extension rowType="http://rs.gbif.org/terms/1.0/Multimedia"
             fieldsTerminatedBy="," ignoreHeaderLines="1">
    <files><location>multimedia.csv</location></files>
    <coreid index="0"/>
    <field index="1" term="http://purl.org/dc/terms/identifier"/>
    <field index="2" term="http://purl.org/dc/terms/format"/>
    <field index="3" term="http://purl.org/dc/terms/creator"/>
    <field index="4" term="http://purl.org/dc/terms/license"/>
  </extension>
</archive>"""
    occurrences = ["id,scientificName,family"]
    media = ["coreid,identifier,format,creator,license"]
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("meta.xml", meta)
        for n, folder in enumerate(FOLDERS[:2]):
            occurrences.append(f"occ{n},{folder.replace('_', ' ')},")
            for photo in sorted((plants / folder).glob("*.jpg"))[:2]:
                zf.write(photo, f"media/{photo.name}")
                media.append(f"occ{n},media/{photo.name},image/jpeg,A. Botanist,CC-BY-4.0")
        media.append("occ0,media/missing.jpg,image/jpeg,,")
        zf.writestr("occurrence.csv", "\n".join(occurrences))
        zf.writestr("multimedia.csv", "\n".join(media))
    async with running(_settings(tmp_path, model_cache)) as (client, _):
        await client.post("/plantid/v1/projects", json={"id": "meadow", "title": "Meadow"})
        started = await client.post(
            "/plantid/v1/projects/meadow/imports", json={"format": "dwca", "source": "dwca.zip"}
        )
        state = await _wait_import(client, started.headers["Location"], eventually)
        assert (state["status"], state["total"], state["done"], state["failed"]) == (
            "finished",
            5,
            4,
            1,
        )
        refs = (await client.get("/plantid/v1/projects/meadow/references")).json()["items"]
        assert {r["author"] for r in refs} == {"A. Botanist"}
        assert {r["license"] for r in refs} == {"CC-BY-4.0"}


@contextlib.asynccontextmanager
async def photo_server(photo: bytes) -> AsyncIterator[str]:
    """A loopback HTTP server holding an observation's photo, as svc-ingest would."""

    async def serve(_: Any) -> Response:
        return Response(photo, media_type="image/jpeg")

    server = uvicorn.Server(
        uvicorn.Config(
            Starlette(routes=[Route("/photo.jpg", serve)]),
            host="127.0.0.1",
            port=0,
            log_config=None,
        )
    )
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:  # noqa: ASYNC110  (uvicorn exposes no event)
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/photo.jpg"
    finally:
        server.should_exit = True
        await task


async def test_observation_created_is_identified_once(
    tmp_path: Path, model_cache: Path, plants: Path, eventually: Callable[..., Any]
) -> None:
    query = sorted((plants / "Galanthus_nivalis").glob("*.jpg"))[10].read_bytes()
    async with (
        photo_server(query) as url,
        # A loopback server stands for a photo host outside the suite: allow-listed.
        running(_settings(tmp_path, model_cache, fetch_allowed_hosts=["127.0.0.1"])) as (
            client,
            app,
        ),
    ):
        await client.post("/plantid/v1/projects", json={"id": "meadow", "title": "Meadow"})
        for folder in FOLDERS:
            await _enrol(client, plants, folder, count=4)
        bus = app.state.runtime.bus
        seen: list[CloudEvent] = []

        async def collect(event: CloudEvent) -> None:
            seen.append(event)

        await bus.subscribe("test.plantid.identified", ["observation.identified"], collect)
        created = new_event(
            "ingest",
            "observation.created",
            {
                "id": "obs-1",
                "datasetID": "meadow",
                "media": [{"id": "m1", "url": url, "type": "image", "format": "image/jpeg"}],
            },
            subject="observation/obs-1",
        )
        ignored = new_event(
            "ingest", "observation.created", {"id": "obs-2", "datasetID": "meadow", "media": []}
        )
        await bus.publish(ignored)
        await bus.publish(created)
        await bus.publish(created)  # redelivered: identified once only
        await eventually(lambda: len(seen) >= 1, timeout=60)
        data = seen[0].data
        assert data["observation_id"] == "obs-1"
        assert data["rejected"] is False
        assert data["candidates"][0]["scientificName"] == "Galanthus nivalis"
        assert data["model_version"].startswith("efficientnet-lite0-")
        assert data["gallery_version"].startswith("meadow/")
        await bus.drain(10)
        assert len(seen) == 1


@pytest.mark.postgres
async def test_runs_on_postgresql(
    tmp_path: Path, model_cache: Path, plants: Path, postgres_url: str, postgres_schema: str
) -> None:
    settings = _settings(
        tmp_path, model_cache, database_url=postgres_url, database_schema=postgres_schema
    )
    async with running(settings) as (client, _):
        await client.post("/plantid/v1/projects", json={"id": "meadow", "title": "Meadow"})
        await _enrol(client, plants, "Viola_sp", count=3)
        assert await _enrol(client, plants, "Viola_sp", count=3) == []  # ON CONFLICT on PostgreSQL
        await _enrol(client, plants, "Galanthus_nivalis", count=3)
        query = sorted((plants / "Viola_sp").glob("*.jpg"))[10].read_bytes()
        assert await _best(client, query) in {"Viola sp.", "Galanthus nivalis"}
        unknown = await client.post(  # refused before anything is charged
            "/v2/identify/nowhere",
            files=[("images", ("q.jpg", query, "image/jpeg")), ("organs", (None, "flower"))],
        )
        assert unknown.status_code == 404
        quota = (await client.get("/v2/quota")).json()
        assert quota["identify"]["used"] == 1
    async with running(settings) as (client, _):  # the block charged ahead was given back
        quota = (await client.get("/v2/quota")).json()
        assert quota["identify"]["used"] == 1


async def test_a_new_model_re_embeds_the_cached_references(
    tmp_path: Path, model_cache: Path, model: ModelSpec, plants: Path
) -> None:
    async with running(_settings(tmp_path, model_cache)) as (client, _):
        await client.post("/plantid/v1/projects", json={"id": "meadow", "title": "Meadow"})
        for folder in FOLDERS[:2]:
            await _enrol(client, plants, folder, count=3)
    own = tmp_path / "observatory-embedder.onnx"
    shutil.copy(model.path, own)
    settings = _settings(
        tmp_path,
        model_cache,
        model_path=own,
        model_output="embedding",
        model_mean=(127.0, 127.0, 127.0),
        model_std=(128.0, 128.0, 128.0),
    )
    async with running(settings) as (client, _):
        query = sorted((plants / "Galanthus_nivalis").glob("*.jpg"))[10].read_bytes()
        response = await client.post(
            "/v2/identify/meadow?no-reject=true",
            files=[("images", ("q.jpg", query, "image/jpeg")), ("organs", (None, "flower"))],
        )
        assert response.status_code == 200, response.text
        assert "observatory-embedder-" in response.json()["version"]
        refs = (await client.get("/plantid/v1/projects/meadow/references")).json()["items"]
        assert {r["modelVersion"] for r in refs} == {
            response.json()["version"].split("(")[1].split(";")[0]
        }


async def test_a_classifier_model_answers_with_its_labels(tmp_path: Path, plants: Path) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.zeros((3, 3), dtype=np.float32)
    weights[1, 2] = 50.0  # the green channel's mean votes for class 2, 'Viola sp.'
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["x"], ["p"]),
            helper.make_node("Flatten", ["p"], ["f"], axis=1),
            helper.make_node("Gemm", ["f", "w"], ["logits"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 64, 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(weights, "w")],
    )
    path = tmp_path / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    labels = tmp_path / "labels.txt"
    labels.write_text("Bellis perennis\nTaraxacum officinale\nViola sp.\n")
    settings = PlantidSettings(
        data_dir=tmp_path,
        model_path=path,
        model_kind="classifier",
        model_labels=labels,
        model_input_size=64,
        model_mean=(0.0, 0.0, 0.0),
        model_std=(255.0, 255.0, 255.0),
        log_level="WARNING",
    )
    async with running(settings) as (client, _):
        photo = sorted((plants / "Galanthus_nivalis").glob("*.jpg"))[0].read_bytes()
        response = await client.post(
            "/v2/identify/anything",
            files=[("images", ("q.jpg", photo, "image/jpeg")), ("organs", (None, "flower"))],
        )
        assert response.status_code == 200, response.text
        body = response.json()
        names = [r["species"]["scientificNameWithoutAuthor"] for r in body["results"]]
        assert names[0] == "Viola sp."
        assert sorted(names) == ["Bellis perennis", "Taraxacum officinale", "Viola sp."]
        assert body["results"][0]["score"] > 0.99
        assert "tiny-" in body["version"]


async def test_identifications_are_counted_and_a_refused_photo_url_is_not_retried(
    tmp_path: Path,
    model_cache: Path,
    plants: Path,
    eventually: Callable[..., Any],
    metric: Callable[..., Awaitable[float]],
) -> None:
    counted = "c4c_plantid_identifications_total"
    async with running(_settings(tmp_path, model_cache)) as (client, app):
        await client.post("/plantid/v1/projects", json={"id": "meadow", "title": "Meadow"})
        for folder in FOLDERS:
            await _enrol(client, plants, folder, count=4)
        identified = await metric(client, counted, project="meadow", outcome="identified")
        errors = await metric(client, counted, project="meadow", outcome="error")
        await _best(client, sorted((plants / "Viola_sp").glob("*.jpg"))[10].read_bytes())
        assert await metric(client, counted, project="meadow", outcome="identified") == (
            identified + 1
        )
        version = app.state.plantid_engine._embedder.version
        assert await metric(client, "c4c_plantid_model_info", model_version=version) == 1

        # Loopback is not a public address and not allow-listed: refused, counted, not retried.
        bus = app.state.runtime.bus
        await bus.publish(
            new_event(
                "ingest",
                "observation.created",
                {
                    "id": "obs-9",
                    "datasetID": "meadow",
                    "media": [{"url": "http://127.0.0.1:9/p.jpg", "format": "image/jpeg"}],
                },
            )
        )
        assert await bus.drain(10)
        assert await metric(client, counted, project="meadow", outcome="error") == errors + 1
        assert await bus.dead_letters("c4c.plantid") == []
