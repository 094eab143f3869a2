"""Scoring on events: a redelivered event scores once, photos are fetched with no database
lock held, EXIF is read from the photo's bytes when the observation lacks it, and the
duplicate check follows the project's rule set."""

from __future__ import annotations

import asyncio
import dataclasses
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
from fastapi import FastAPI
from PIL import Image
from sqlalchemy import text

from c4c.quality.images import analyse, hamming
from c4c.shared.bus import CloudEvent, new_event

PREFIX = "/quality/v1"
PHOTO_URL = "http://media.test/photo.jpg"


def created(body: dict[str, Any]) -> CloudEvent:
    return new_event("ingest", "observation.created", body, subject=f"observation/{body['id']}")


async def collect_scored(app: FastAPI, unique_name: Callable[[str], str]) -> list[CloudEvent]:
    seen: list[CloudEvent] = []

    async def keep(event: CloudEvent) -> None:
        seen.append(event)

    await app.state.runtime.bus.subscribe(unique_name("scored"), ["observation.scored"], keep)
    return seen


def photo(test_data: Path, species: str = "Helianthus_annuus") -> bytes:
    return sorted((test_data / "plants" / species).glob("*.jpg"))[0].read_bytes()


async def test_a_redelivered_event_is_scored_once(
    app: FastAPI,
    client: httpx.AsyncClient,
    observation: Any,
    unique_name: Callable[[str], str],
    eventually: Any,
) -> None:
    scored = await collect_scored(app, unique_name)
    event = created(observation())
    bus = app.state.runtime.bus
    await bus.publish(event)
    await bus.publish(event)  # the same id again: a redelivery
    await eventually(lambda: len(scored) >= 1, timeout=60)
    await bus.drain(10)
    assert len(scored) == 1
    assert scored[0].data["observation_id"] == observation()["id"]
    history = (await client.get(f"{PREFIX}/assessments/{observation()['id']}")).json()
    assert len(history["history"]) == 1
    assert history["latest"]["assessment_id"] == scored[0].data["assessment_id"]


async def test_photos_are_fetched_with_no_database_lock_held(
    app: FastAPI,
    media: Any,
    observation: Any,
    test_data: Path,
    unique_name: Callable[[str], str],
    eventually: Any,
) -> None:
    """While the consumer fetches a photo, another session can write: the fetch does not
    happen inside the consumer's transaction (SQLite's write lock, a pooled connection)."""
    db = app.state.runtime.db
    writes_during_fetch: list[bool] = []

    class WritingWhileFetched:
        async def fetch(self, url: str, *, max_bytes: int) -> bytes:
            async def write() -> None:
                async with db.sessions() as session, session.begin():
                    await session.execute(text("CREATE TABLE IF NOT EXISTS probe (x INTEGER)"))

            try:
                await asyncio.wait_for(write(), timeout=5)
                writes_during_fetch.append(True)
            except TimeoutError:
                writes_during_fetch.append(False)
            return bytes(await media.fetch(url, max_bytes=max_bytes))

    media.files[PHOTO_URL] = photo(test_data)
    app.state.parts.media = WritingWhileFetched()
    scored = await collect_scored(app, unique_name)
    media_item = {"id": "m-1", "url": PHOTO_URL, "type": "image", "format": "image/jpeg"}
    await app.state.runtime.bus.publish(created(observation(media=[media_item])))
    await eventually(lambda: len(scored) >= 1, timeout=60)
    assert writes_during_fetch == [True]
    codes = {f["code"] for f in scored[0].data["flags"]}
    assert "MEDIA_MISSING" not in codes
    assert "MULTIMEDIA_URI_INVALID" not in codes


def _with_exif_date(data: bytes, taken: str) -> bytes:
    image = Image.open(io.BytesIO(data))
    exif = Image.Exif()
    exif[0x0132] = taken  # DateTime, what cameras write next to DateTimeOriginal
    out = io.BytesIO()
    image.save(out, format="JPEG", exif=exif.tobytes(), quality=90)
    return out.getvalue()


async def test_exif_is_read_from_the_photo_when_the_observation_lacks_it(
    client: httpx.AsyncClient, media: Any, observation: Any, test_data: Path
) -> None:
    media.files[PHOTO_URL] = _with_exif_date(photo(test_data), "2019:08:01 12:00:00")
    bare = {"id": "m-1", "url": PHOTO_URL, "type": "image"}  # no created/exifLatitude
    response = await client.post(f"{PREFIX}/assessments", json=observation(media=[bare]))
    assert response.status_code == 200, response.text
    flags = {f["code"]: f for f in response.json()["flags"]}
    assert flags["RECORDED_DATE_MISMATCH"]["evidence"]["exifDate"].startswith("2019-08-01")
    # What the observation says wins over the bytes: a capture time that agrees.
    stated = {**bare, "created": "2024-05-03T09:00:00+02:00"}
    response = await client.post(f"{PREFIX}/assessments", json=observation(media=[stated]))
    assert "RECORDED_DATE_MISMATCH" not in {f["code"] for f in response.json()["flags"]}


async def test_duplicates_follow_the_rule_sets_max_distance(
    app: FastAPI,
    client: httpx.AsyncClient,
    media: Any,
    observation: Any,
    test_data: Path,
    unique_name: Callable[[str], str],
    eventually: Any,
) -> None:
    original = photo(test_data, "Fritillaria_meleagris")
    image = cv2.imdecode(np.frombuffer(original, dtype=np.uint8), cv2.IMREAD_COLOR)
    # The same photo brightened and re-encoded: a near-duplicate a few bits away.
    copy = cv2.imencode(".jpg", cv2.convertScaleAbs(image, alpha=1.3, beta=20))[1].tobytes()
    first = analyse(original, "a", max_pixels=10**8).phash
    second = analyse(copy, "b", max_pixels=10**8).phash
    assert first is not None
    assert second is not None
    distance = hamming(first, second)
    assert 0 < distance <= 6, "the copy must differ a little for this test to mean something"

    media.files[PHOTO_URL] = original
    media.files["http://media.test/copy.jpg"] = copy
    scored = await collect_scored(app, unique_name)
    indexed = {"id": "m-original", "url": PHOTO_URL, "type": "image"}
    await app.state.runtime.bus.publish(
        created(observation(id="obs-original", recordedBy="someone-else", media=[indexed]))
    )
    await eventually(lambda: len(scored) >= 1, timeout=60)

    reused = observation(
        id="obs-copy", media=[{"id": "m-copy", "url": "http://media.test/copy.jpg"}]
    )

    async def duplicate_flagged() -> bool:
        body = (await client.post(f"{PREFIX}/assessments", json=reused)).json()
        return "IMAGE_DUPLICATE" in {f["code"] for f in body["flags"]}

    assert await duplicate_flagged()  # the built-in max_distance is 6
    strict = {"checks": {"duplicates": {"params": {"max_distance": distance - 1}}}}
    put = await client.put(f"{PREFIX}/rulesets/{reused['datasetID']}", json=strict)
    assert put.status_code == 200, put.text
    assert not await duplicate_flagged()


async def test_an_observers_past_readings_flag_a_stuck_sensor(
    app: FastAPI,
    observation: Any,
    unique_name: Callable[[str], str],
    eventually: Any,
) -> None:
    """The observer's earlier readings come from the store (a JSON column queried on both
    databases) and the fifth identical reading is flagged as stuck."""
    scored = await collect_scored(app, unique_name)
    bus = app.state.runtime.bus
    reading = [{"measurementType": "PM2.5", "measurementValue": 12.0, "measurementUnit": "µg/m³"}]
    for n in range(5):
        body = observation(
            id=f"0b7c6f5e-2222-4c1e-9c4e-00000000000{n}",
            eventDate=f"2024-05-0{n + 1}T10:15:00+02:00",
            measurements=reading,
        )
        await bus.publish(created(body))
        await eventually(lambda n=n: len(scored) == n + 1, timeout=60)
    codes = [[flag["code"] for flag in event.data["flags"]] for event in scored]
    assert "MEASUREMENT_STUCK" not in codes[0]
    assert "MEASUREMENT_STUCK" in codes[-1]


def _seen(body: dict[str, Any], *, deleted: bool = False) -> Any:
    from c4c.quality.models import SeenObservation

    return SeenObservation(
        id=body["id"], version=body["version"], body=body, deleted=deleted, recorded_by="u"
    )


def test_changes_settle_in_order_and_the_later_version_is_never_lost() -> None:
    from datetime import UTC, datetime

    from c4c.quality.service import Change, settle

    when = datetime(2024, 5, 3, tzinfo=UTC)
    body = {"id": "o-1", "version": 1, "scientificName": "Bellis perennis", "media": []}
    photo_added = Change(
        "o-1", when, changed={"media": [{"id": "m-1", "url": PHOTO_URL}]}, version=2
    )
    # A creation then the update its photo brought: one state, the latest version.
    state = settle(None, [Change("o-1", when, body=body), photo_added])
    assert state.body is not None
    assert state.body["version"] == 2
    assert [m["id"] for m in state.body["media"]] == ["m-1"]
    # The creation redelivered after the update: the later version stays.
    later = settle(_seen(state.body), [Change("o-1", when, body=body)])
    assert later.body is None
    # An update of an observation never seen: missing (the caller fetches it) ...
    assert settle(None, [photo_added]).missing
    # ... unless ingest's whole observation came with it.
    fetched = {**body, "version": 2}
    assert settle(None, [dataclasses.replace(photo_added, body=fetched)]).body == fetched
    # Nothing but a creation revives a deleted observation; a verdict re-scores the rest.
    assert settle(_seen(body, deleted=True), [photo_added]).body is None
    assert settle(_seen(body), [Change("o-1", when, verdict={})]).body == body


async def test_a_creation_and_its_update_arriving_together_score_the_latest_version(
    app: FastAPI,
    client: httpx.AsyncClient,
    media: Any,
    observation: Any,
    test_data: Path,
    unique_name: Callable[[str], str],
    eventually: Any,
) -> None:
    media.files[PHOTO_URL] = photo(test_data)
    scored = await collect_scored(app, unique_name)
    body = observation(id="obs-together")
    update = new_event(
        "ingest",
        "observation.updated",
        {
            "id": body["id"],
            "version": 2,
            "changed": {"media": [{"id": "m-1", "url": PHOTO_URL, "type": "image"}]},
        },
        subject=f"observation/{body['id']}",
    )
    bus = app.state.runtime.bus
    await asyncio.gather(bus.publish(created(body)), bus.publish(update))
    await eventually(lambda: scored and scored[-1].data["observation_version"] == 2, timeout=30)
    latest = scored[-1].data
    assert "MEDIA_MISSING" not in {f["code"] for f in latest["flags"]}
    history = (await client.get(f"{PREFIX}/assessments/{body['id']}")).json()
    assert history["latest"]["observation_version"] == 2
    assert len(history["history"]) == len(scored) <= 2


async def test_a_bad_event_fails_alone_and_the_others_of_its_batch_are_scored(
    app: FastAPI,
    observation: Any,
    unique_name: Callable[[str], str],
    eventually: Any,
) -> None:
    scored = await collect_scored(app, unique_name)
    runtime = app.state.runtime
    good = [created(observation(id=f"obs-good-{n}")) for n in range(5)]
    bad = new_event("ingest", "observation.updated", {"changed": "not an update"})
    await asyncio.gather(*(runtime.bus.publish(e) for e in [*good, bad]))
    await eventually(lambda: len(scored) >= len(good), timeout=30)
    assert {e.data["observation_id"] for e in scored} == {f"obs-good-{n}" for n in range(5)}
    parked = await runtime.bus.dead_letters(runtime.queue)
    assert [p.event.id for p in parked] == [bad.id]


async def test_not_ready_until_the_taxonomy_and_geography_are_loaded(
    settings: Any, media: Any, eventually: Any
) -> None:
    from c4c.quality.app import create_app
    from c4c.quality.service import Knowledge

    class Gated(Knowledge):
        def __init__(self) -> None:
            super().__init__()
            self.gate = asyncio.Event()

        async def load(self) -> None:
            await self.gate.wait()
            await super().load()

    app = create_app(settings.model_copy(update={"preload": True}))
    knowledge = app.state.parts.knowledge = Gated()
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://q.test") as client:
            answer = await client.get("/readyz")
            assert answer.status_code == 503
            assert answer.json()["checks"]["knowledge"] is False
            knowledge.gate.set()

            async def ready() -> bool:
                return (await client.get("/readyz")).status_code == 200

            await eventually(ready, timeout=120)


async def test_batches_keep_new_and_known_snapshots_and_index_each_photo_once(
    app: FastAPI,
    client: httpx.AsyncClient,
    media: Any,
    observation: Any,
    test_data: Path,
    unique_name: Callable[[str], str],
    eventually: Any,
) -> None:
    """The writes of a batch go in a few statements: snapshots of observations seen before
    are updated and new ones inserted side by side, and a photo analysed again replaces its
    row in the duplicate index."""
    second_url = "http://media.test/second.jpg"
    media.files[PHOTO_URL] = photo(test_data)
    media.files[second_url] = photo(test_data, "Iris_sp")
    scored = await collect_scored(app, unique_name)
    bus = app.state.runtime.bus

    def photo_update(version: int, *items: dict[str, Any]) -> CloudEvent:
        data = {"id": "obs-a", "version": version, "changed": {"media": list(items)}}
        return new_event("ingest", "observation.updated", data, subject="observation/obs-a")

    def versions() -> set[tuple[str, int]]:
        return {(e.data["observation_id"], e.data["observation_version"]) for e in scored}

    first = {"id": "m-1", "url": PHOTO_URL, "type": "image"}
    second = {"id": "m-2", "url": second_url, "type": "image"}
    await bus.publish(created(observation(id="obs-a")))
    await eventually(lambda: ("obs-a", 1) in versions(), timeout=30)
    # A known observation's photo and a new observation, in one batch.
    await asyncio.gather(
        bus.publish(photo_update(2, first)), bus.publish(created(observation(id="obs-b")))
    )
    await eventually(lambda: {("obs-a", 2), ("obs-b", 1)} <= versions(), timeout=30)
    # The first photo again (its analysis kept) beside a second one.
    await bus.publish(photo_update(3, first, second))
    await eventually(lambda: ("obs-a", 3) in versions(), timeout=30)

    async with app.state.runtime.db.sessions() as session:
        snapshots = dict(
            (await session.execute(text("SELECT id, version FROM observations"))).all()
        )
        indexed = (await session.execute(text("SELECT media_id, observation_id FROM images"))).all()
    assert snapshots == {"obs-a": 3, "obs-b": 1}
    assert sorted(indexed) == [("m-1", "obs-a"), ("m-2", "obs-a")]
    history = (await client.get(f"{PREFIX}/assessments/obs-a")).json()["history"]
    assert sorted(item["observation_version"] for item in history) == [1, 2, 3]
    latest = next(e.data for e in scored if e.data["observation_version"] == 3)
    # Its own photos, indexed earlier, are no duplicates of it.
    assert "IMAGE_DUPLICATE" not in {f["code"] for f in latest["flags"]}
