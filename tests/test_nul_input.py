"""Text no database stores (a NUL, which PostgreSQL's text and jsonb refuse; a lone
surrogate, which no UTF-8 encodes) in any string a request or an event brings to quality,
video and plantid: a 422 problem for a request, never a 500; a bad event is dead-lettered
or set aside, never retried forever, and the events beside it are handled. On SQLite and
PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from c4c.plantid.app import create_app as create_plantid
from c4c.plantid.engine.embedder import default_model
from c4c.plantid.settings import PlantidSettings
from c4c.quality.app import create_app as create_quality
from c4c.quality.settings import QualitySettings
from c4c.shared.bus import CloudEvent, new_event
from c4c.shared.problems import PROBLEM_MEDIA_TYPE
from c4c.video.app import create_app as create_video
from c4c.video.settings import VideoSettings

NUL = "\u0000"
LONE_SURROGATE = "\\ud800"  # as a JSON escape: Python's str holds it, UTF-8 cannot

OBSERVATION: dict[str, Any] = {
    "id": "obs-1",
    "version": 1,
    "datasetID": "natusfera",
    "recordedBy": "user-1",
    "eventDate": "2024-05-03T10:15:00+02:00",
    "decimalLatitude": 41.3851,
    "decimalLongitude": 2.1734,
    "countryCode": "ES",
    "scientificName": "Quercus ilex",
    "basisOfRecord": "HumanObservation",
    "individualCount": "some",
    "degreeOfEstablishment": "native",
    "media": [
        {
            "id": "m-1",
            "url": "http://media.test/a.jpg",
            "type": "image",
            "format": "image/jpeg",
            "created": "2024-05-03T10:15:00",
        }
    ],
    "identifications": [{"identifiedBy": "user-2", "scientificName": "Quercus ilex"}],
    "measurements": [
        {"measurementType": "height", "measurementValue": "tall", "measurementUnit": "m"}
    ],
}
STREAM: dict[str, Any] = {
    "name": "cam",
    "url": "rtsp://camera.site.invalid/cam",
    "lines": [{"name": "gate", "points": [[0.1, 0.5], [0.9, 0.5]]}],
    "zones": [{"name": "pond", "polygon": [[0.1, 0.1], [0.5, 0.1], [0.3, 0.4]]}],
    "start": False,
}


def poisoned(value: Any, path: str = "", *, keys: bool = True) -> Iterator[tuple[str, Any]]:
    """For each string in ``value`` (and each key, with ``keys``): its path, and ``value``
    with a NUL inside that string."""
    if isinstance(value, str):
        yield path, value[:1] + NUL + value[1:]
    elif isinstance(value, dict):
        for key, item in value.items():
            if keys:
                yield (
                    f"{path}/{key} (key)",
                    {(k[:1] + NUL + k[1:] if k == key else k): v for k, v in value.items()},
                )
            for where, bad in poisoned(item, f"{path}/{key}", keys=keys):
                yield where, {**value, key: bad}
    elif isinstance(value, list):
        for index, item in enumerate(value):
            for where, bad in poisoned(item, f"{path}/{index}", keys=keys):
                yield where, [*value[:index], bad, *value[index + 1 :]]


def encodings(body: Any) -> list[bytes]:
    """The body as JSON twice: with the NUL, and with a lone surrogate in its place."""
    text = json.dumps(body)
    assert "\\u0000" in text
    return [text.encode(), text.replace("\\u0000", LONE_SURROGATE).encode()]


def refused(response: httpx.Response, where: str) -> None:
    assert response.status_code == 422, (where, response.status_code, response.text)
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE, where


async def send_each(
    send: Callable[[bytes], Any],
    body: Any,
    *,
    skip: frozenset[str] = frozenset(),
    keys: bool = True,
) -> int:
    """Sends every poisoned variant of ``body``; asserts each is refused; how many went."""
    sent = 0
    for where, bad in poisoned(body, keys=keys):
        if where in skip:
            continue
        for content in encodings(bad):
            refused(await send(content), where)
            sent += 1
    return sent


JSON = {"content-type": "application/json"}


def client_of(app: FastAPI) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://service.test", timeout=60)


# --- every request body ---------------------------------------------------------------------


def unconstrained(schema: dict[str, Any], components: dict[str, Any], path: str = "") -> list[str]:
    """Where a request body's schema lets any string through: no pattern (``Storable`` or
    stricter), no enumeration, not a file."""
    if "$ref" in schema:
        return unconstrained(components[schema["$ref"].split("/")[-1]], components, path)
    found = []
    for alternatives in ("anyOf", "oneOf", "allOf"):
        for alternative in schema.get(alternatives, []):
            found += unconstrained(alternative, components, path)
    checks = {"pattern", "enum", "const", "contentMediaType"}  # (a file has a media type)
    if schema.get("type") == "string" and not checks & schema.keys():
        found.append(path or "/")
    for name, field in schema.get("properties", {}).items():
        found += unconstrained(field, components, f"{path}/{name}")
    for part, where in (("additionalProperties", "*"), ("propertyNames", "(key)"), ("items", "-")):
        if isinstance(schema.get(part), dict):
            found += unconstrained(schema[part], components, f"{path}/{where}")
    return found


@pytest.mark.parametrize(
    "create",
    [
        lambda d: create_quality(QualitySettings(data_dir=d)),
        lambda d: create_video(VideoSettings(data_dir=d)),
        lambda d: create_plantid(PlantidSettings(data_dir=d)),
    ],
    ids=["quality", "video", "plantid"],
)
def test_every_string_a_request_body_brings_is_constrained(
    create: Callable[[Path], FastAPI], tmp_path: Path
) -> None:
    """So that a field added later cannot forget ``Storable``."""
    spec = create(tmp_path).openapi()
    components = spec.get("components", {}).get("schemas", {})
    found = {
        f"{method.upper()} {route} {where}"
        for route, operations in spec["paths"].items()
        for method, operation in operations.items()
        for content in operation.get("requestBody", {}).get("content", {}).values()
        for where in unconstrained(content["schema"], components)
    }
    assert not found


# --- quality --------------------------------------------------------------------------------


@pytest.fixture
async def quality(tmp_path: Path, database: dict[str, str]) -> AsyncIterator[FastAPI]:
    app = create_quality(QualitySettings(data_dir=tmp_path, outbox_poll_interval=0.05, **database))
    async with app.router.lifespan_context(app):
        yield app


async def test_quality_refuses_unstorable_text_in_every_string(quality: FastAPI) -> None:
    async with client_of(quality) as client:
        # The same model reads the events whose observations are stored. Unknown keys are
        # ignored (never stored), so only values count.
        sent = await send_each(
            lambda c: client.post("/quality/v1/assessments", content=c, headers=JSON),
            OBSERVATION,
            keys=False,
        )
        batch = await client.post(
            "/quality/v1/assessments:batch",
            json=[OBSERVATION, {**OBSERVATION, "scientificName": "Quercus" + NUL}],
        )
        assert batch.status_code == 200, batch.text
        items = batch.json()["items"]
        assert [item["status"] for item in items] == ["assessed", "error"]
        assert items[1]["problem"]["status"] == 422
        # Rule sets are stored as they come: keys too (an unknown one is echoed in the answer).
        ruleset = {
            "checks": {
                "duplicates": {"params": {"max_distance": 10}},
                "media_present": {"enabled": False},
            }
        }
        sent += await send_each(
            lambda c: client.put("/quality/v1/rulesets/p", content=c, headers=JSON), ruleset
        )
        kept = await client.put("/quality/v1/rulesets/p", json=ruleset)
        assert kept.status_code == 200, kept.text
    assert sent > 20


async def test_a_quality_event_with_unstorable_text_is_dead_lettered_alone(
    quality: FastAPI, unique_name: Callable[[str], str], eventually: Any
) -> None:
    scored: list[CloudEvent] = []

    async def keep(event: CloudEvent) -> None:
        scored.append(event)

    runtime = quality.state.runtime
    await runtime.bus.subscribe(unique_name("scored"), ["observation.scored"], keep)

    def created(body: dict[str, Any]) -> CloudEvent:
        return new_event("ingest", "observation.created", body, subject=f"observation/{body['id']}")

    good = [created({**OBSERVATION, "id": f"good-{n}", "media": []}) for n in range(3)]
    bad = [
        created({**OBSERVATION, "id": "bad-name", "media": [], "scientificName": "Q" + NUL}),
        created({**OBSERVATION, "id": "bad-id" + NUL, "media": []}),
        new_event(
            "ingest",
            "observation.updated",
            {"id": "good-0", "version": 2, "changed": {"recordedBy": "x" + NUL}},
        ),
    ]
    await asyncio.gather(*(runtime.bus.publish(e) for e in good))
    await eventually(lambda: len(scored) >= len(good), timeout=30)
    await asyncio.gather(*(runtime.bus.publish(e) for e in bad))

    async def all_parked() -> bool:
        parked = await runtime.bus.dead_letters(runtime.queue)
        return {p.event.id for p in parked} == {e.id for e in bad}

    await eventually(all_parked, timeout=60)
    assert {e.data["observation_id"] for e in scored} == {f"good-{n}" for n in range(3)}
    async with client_of(quality) as client:
        kept = (await client.get("/quality/v1/assessments/good-0")).json()
    assert kept["latest"]["observation_version"] == 1  # the bad update changed nothing


# --- video ----------------------------------------------------------------------------------


@pytest.fixture
async def video(tmp_path: Path, database: dict[str, str]) -> AsyncIterator[FastAPI]:
    settings = VideoSettings(
        data_dir=tmp_path, log_format="text", allowed_hosts=["camera.site.invalid"], **database
    )
    app = create_video(settings)
    async with app.router.lifespan_context(app):
        yield app


async def test_video_refuses_unstorable_text_in_every_string(video: FastAPI) -> None:
    async with client_of(video) as client:
        sent = await send_each(
            lambda c: client.post("/video/v1/streams", content=c, headers=JSON), STREAM
        )
        created = await client.post("/video/v1/streams", json=STREAM)
        assert created.status_code == 201, created.text
        url = f"/video/v1/streams/{created.json()['id']}"
        patch = {key: STREAM[key] for key in ("name", "url", "lines", "zones")}
        sent += await send_each(lambda c: client.patch(url, content=c, headers=JSON), patch)
        assert (await client.get(url)).json()["name"] == "cam"
    assert sent > 10


# --- plantid --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("plantid-models")
    default_model(cache)
    return cache


@pytest.fixture
async def plantid(
    tmp_path: Path, model_cache: Path, database: dict[str, str]
) -> AsyncIterator[FastAPI]:
    (tmp_path / "imports").mkdir()
    settings = PlantidSettings(
        data_dir=tmp_path, model_cache=model_cache, log_level="WARNING", **database
    )
    app = create_plantid(settings)
    async with app.router.lifespan_context(app):
        yield app


ENROLMENT = {
    "species": "Bellis perennis",
    "organ": "flower",
    "author": "A. Author",
    "license": "cc-by-sa",
    "authorship": "L.",
    "genus": "Bellis",
    "family": "Asteraceae",
    "common_names": "en:Daisy;fr:Paquerette",
}


async def test_plantid_refuses_unstorable_text_in_every_string(
    plantid: FastAPI, test_data: Path
) -> None:
    async with client_of(plantid) as client:
        sent = await send_each(
            lambda c: client.post("/plantid/v1/projects", content=c, headers=JSON),
            {"id": "meadow", "title": "Meadow", "description": "Flowers"},
            skip=frozenset({"/id"}),  # a slug: its pattern refuses NUL already
        )
        created = await client.post("/plantid/v1/projects", json={"id": "meadow", "title": "M"})
        assert created.status_code == 201, created.text
        sent += await send_each(
            lambda c: client.post("/plantid/v1/projects/meadow/imports", content=c, headers=JSON),
            {"format": "folder", "source": "spring"},
            skip=frozenset({"/format"}),
        )
        photo = sorted((test_data / "plants").glob("*/*.jpg"))[0].read_bytes()
        # Only values (an unknown field is ignored) and only NUL (a field that is not UTF-8
        # is read as Latin-1, which stores).
        for field, bad in poisoned(ENROLMENT, keys=False):
            response = await client.post(
                "/plantid/v1/projects/meadow/references",
                files=[("images", ("a.jpg", photo, "image/jpeg"))],
                data=bad,
            )
            refused(response, field)
            sent += 1
        listed = await client.get("/plantid/v1/projects/meadow/references")
        assert listed.json()["total"] == 0
    assert sent > 10
