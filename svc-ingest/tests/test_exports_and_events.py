"""Exports read back by third-party tools (python-dwca-reader, geojson-pydantic) equal to the
API's own view; write-backs from quality, plant identification and video, applied once."""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from dwca.read import DwCAReader
from geojson_pydantic import FeatureCollection

from c4c.ingest.exports import CORE
from c4c.ingest.schemas import ObservationIdentified, ObservationScored
from c4c.shared.bus import CloudEvent, new_event
from c4c.video.models import DetectionRow
from c4c.video.service import detection_event_data

API = "/ingest/v1"
Body = Callable[..., dict[str, Any]]
DWC = "http://rs.tdwg.org/dwc/terms/"


async def populate(
    client: httpx.AsyncClient, observation: Body, test_data: Path
) -> list[dict[str, Any]]:
    bodies = [
        observation(
            scientificName="Quercus ilex", occurrenceRemarks='tricky, "quoted"\nand multi-line'
        ),
        observation(
            scientificName="Bellis perennis",
            eventDate="2024-05",
            locationObscured=True,
            measurements=[
                {
                    "measurementType": "odour intensity",
                    "measurementValue": 3,
                    "measurementUnit": "level",
                },
                {"measurementType": "hedonic tone", "measurementValue": "unpleasant"},
            ],
        ),
        observation(datasetID="other", scientificName=None, vernacularName=None, license="CC0"),
    ]
    ids = [(await client.post(f"{API}/observations", json=b)).json()["id"] for b in bodies]
    photo = test_data / "plants" / "Crocus_sp"
    for path in sorted(photo.glob("*.jpg"))[:2]:
        response = await client.post(
            f"{API}/observations/{ids[0]}/media", content=path.read_bytes()
        )
        assert response.status_code == 201
    return [(await client.get(f"{API}/observations/{i}")).json() for i in ids]


async def test_darwin_core_archive_reads_back_equal(
    client: httpx.AsyncClient, observation: Body, test_data: Path, tmp_path: Path
) -> None:
    stored = {o["id"]: o for o in await populate(client, observation, test_data)}
    response = await client.get(f"{API}/observations:export?format=dwca")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/zip"
    archive = tmp_path / "export.zip"
    archive.write_bytes(response.content)

    with DwCAReader(str(archive)) as dwca:
        assert dwca.metadata is not None  # eml.xml parsed
        rows = list(dwca)
        assert {r.id for r in rows} == set(stored)
        for row in rows:
            o = stored[row.id]
            for name, term, get in CORE:
                value = get(o)
                expected = "" if value is None else str(value)
                assert row.data[term] == expected, (name, row.data[term], expected)
            media = [e for e in row.extensions if e.rowtype.endswith("Multimedia")]
            assert sorted(m.data["http://purl.org/dc/terms/identifier"] for m in media) == sorted(
                m["url"] for m in o["media"]
            )
            facts = [e for e in row.extensions if e.rowtype.endswith("MeasurementOrFact")]
            assert [
                (f.data[DWC + "measurementType"], f.data[DWC + "measurementValue"]) for f in facts
            ] == [(m["measurementType"], str(m["measurementValue"])) for m in o["measurements"]]


async def test_geojson_is_valid_rfc7946(
    client: httpx.AsyncClient, observation: Body, test_data: Path
) -> None:
    stored = {o["id"]: o for o in await populate(client, observation, test_data)}
    response = await client.get(f"{API}/observations:export?format=geojson")
    assert response.headers["content-type"] == "application/geo+json"
    collection = FeatureCollection.model_validate_json(response.content)
    assert {f.id for f in collection.features} == set(stored)
    for feature in collection.features:
        o = stored[str(feature.id)]
        assert feature.geometry is not None
        assert list(feature.geometry.coordinates) == [o["decimalLongitude"], o["decimalLatitude"]]
        assert feature.properties is not None
        assert feature.properties["scientificName"] == o["scientificName"]


async def test_csv_export_uses_the_same_filters(
    client: httpx.AsyncClient, observation: Body, test_data: Path
) -> None:
    stored = await populate(client, observation, test_data)
    response = await client.get(
        f"{API}/observations:export?format=csv&project=natusfera&hasMedia=true"
    )
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [r["id"] for r in rows] == [stored[0]["id"]]
    assert rows[0]["occurrenceRemarks"] == stored[0]["occurrenceRemarks"]
    assert rows[0]["mediaCount"] == "2"
    everything = list(
        csv.DictReader(io.StringIO((await client.get(f"{API}/observations:export")).text))
    )
    assert len(everything) == 3
    bad = await client.get(f"{API}/observations:export?format=xls")
    assert bad.status_code == 422


async def test_export_streams_many_batches(
    client: httpx.AsyncClient, observation: Body, app: Any
) -> None:
    app.state.parts.settings.export_batch = 7
    body = [observation(id=str(uuid.uuid4())) for _ in range(30)]
    assert (await client.post(f"{API}/observations:batch", json=body)).json()["created"] == 30
    rows = list(csv.DictReader(io.StringIO((await client.get(f"{API}/observations:export")).text)))
    assert sorted(r["id"] for r in rows) == sorted(b["id"] for b in body)


# --- consumed events --------------------------------------------------------------------------


async def test_scores_and_identifications_are_written_back_once(
    client: httpx.AsyncClient, observation: Body, app: Any, eventually: Any
) -> None:
    obs_id = (await client.post(f"{API}/observations", json=observation())).json()["id"]
    bus = app.state.runtime.bus
    scored = new_event(
        "quality",
        "observation.scored",
        {"observation_id": obs_id, "score": 0.7, "grade": "needs_id", "flags": ["blurry"]},
    )
    identified = new_event(
        "plantid",
        "observation.identified",
        {
            "observation_id": obs_id,
            "model_version": "effnet-2026.1",
            "candidates": [
                {"scientificName": "Quercus ilex", "score": 0.91, "taxonRank": "species"},
                {"scientificName": "Quercus suber", "score": 0.05},
            ],
        },
    )
    for event in (scored, identified, identified, scored):  # redeliveries
        await bus.publish(event)

    async def written() -> bool:
        o = (await client.get(f"{API}/observations/{obs_id}")).json()
        return o["quality"]["grade"] == "needs_id" and o["bestMachineIdentification"] is not None

    await eventually(written)
    await bus.drain(10)
    o = (await client.get(f"{API}/observations/{obs_id}")).json()
    assert o["quality"]["score"] == 0.7
    assert o["quality"]["flags"] == ["blurry"]
    assert o["bestMachineIdentification"]["scientificName"] == "Quercus ilex"
    assert o["bestMachineIdentification"]["modelVersion"] == "effnet-2026.1"
    machine = [i for i in o["identifications"] if i["kind"] == "machine"]
    assert len(machine) == 1  # the redelivered event had no second effect


async def test_a_batch_of_write_backs_keeps_the_latest_of_each_observation(
    client: httpx.AsyncClient, observation: Body, app: Any
) -> None:
    first, second = [
        (await client.post(f"{API}/observations", json=observation())).json()["id"]
        for _ in range(2)
    ]
    t0 = datetime.now(UTC)

    def score(obs_id: str, grade: str, minutes: int) -> tuple[ObservationScored, datetime]:
        data = {"observation_id": obs_id, "score": minutes, "grade": grade, "flags": []}
        return ObservationScored.model_validate(data), t0 + timedelta(minutes=minutes)

    def verdict(obs_id: str, name: str | None, minutes: int) -> tuple[Any, datetime]:
        data = {
            "observation_id": obs_id,
            "model_version": "m1",
            "candidates": [{"scientificName": name, "score": 0.5}] if name else [],
        }
        return ObservationIdentified.model_validate(data), t0 + timedelta(minutes=minutes)

    async with app.state.parts.unit() as ingest:
        await ingest.apply_write_backs(
            [
                score(first, "needs_id", 2),
                score(second, "casual", 1),
                score(first, "research", 3),
                score(str(uuid.uuid4()), "research", 1),  # not stored here
                score(first, "casual", 1),  # older than the one kept before it: dropped
            ],
            [
                verdict(first, "Quercus suber", 2),
                verdict(first, "Quercus ilex", 1),
                verdict(first, None, 4),  # rejected: nothing to keep
            ],
        )
    async with app.state.parts.unit() as ingest:  # late, in a batch of its own
        await ingest.apply_write_backs([score(first, "needs_id", 2)], [])
    a = (await client.get(f"{API}/observations/{first}")).json()
    b = (await client.get(f"{API}/observations/{second}")).json()
    assert (a["quality"]["grade"], a["quality"]["score"]) == ("research", 3)
    assert (b["quality"]["grade"], b["quality"]["score"]) == ("casual", 1)
    assert a["bestMachineIdentification"]["scientificName"] == "Quercus suber"
    machine = sorted(i["scientificName"] for i in a["identifications"] if i["kind"] == "machine")
    assert machine == ["Quercus ilex", "Quercus suber"]


async def test_a_burst_of_write_backs_ends_with_the_latest_score_of_each(
    client: httpx.AsyncClient, observation: Body, app: Any, eventually: Any
) -> None:
    ids = [
        (await client.post(f"{API}/observations", json=observation())).json()["id"]
        for _ in range(10)
    ]
    bus = app.state.runtime.bus
    t0 = datetime.now(UTC)
    burst = []
    for minutes in (3, 1, 2):  # the latest first: the others arrive late
        for obs_id in ids:
            event = new_event(
                "quality",
                "observation.scored",
                {"observation_id": obs_id, "score": minutes, "grade": "casual", "flags": []},
            )
            burst.append(event.model_copy(update={"time": t0 + timedelta(minutes=minutes)}))
    for event in burst + burst[:5]:  # and some redeliveries
        await bus.publish(event)

    async def scored() -> bool:
        items = [(await client.get(f"{API}/observations/{i}")).json() for i in ids]
        return all(o["quality"]["grade"] == "casual" for o in items)

    await eventually(scored)
    await bus.drain(10)
    for obs_id in ids:
        assert (await client.get(f"{API}/observations/{obs_id}")).json()["quality"]["score"] == 3


async def test_a_detection_becomes_a_machine_observation(
    client: httpx.AsyncClient, app: Any, events: list[CloudEvent], eventually: Any
) -> None:
    detection = new_event(
        "video",
        "detection.created",
        {
            "detection_id": "det-42",
            "stream_id": "cam-3",
            "project": "birdcams",
            "start": "2024-05-03T10:15:00Z",
            "end": "2024-05-03T10:15:04Z",
            "label": "Cacatua galerita",
            "score": 0.88,
            "latitude": -33.86,
            "longitude": 151.2,
            "snapshot_url": "http://suite.test/video/v1/snapshots/det-42.jpg",
        },
    )
    bus = app.state.runtime.bus
    await bus.publish(detection)
    await bus.publish(detection)
    await eventually(lambda: any(e.type == "observation.created" for e in events))
    await bus.drain(10)
    listing = (await client.get(f"{API}/observations?project=birdcams")).json()["items"]
    assert len(listing) == 1
    [o] = listing
    assert o["basisOfRecord"] == "MachineObservation"
    assert o["scientificName"] == "Cacatua galerita"
    assert o["eventDate"] == "2024-05-03T10:15:00Z/2024-05-03T10:15:04Z"
    assert [m["url"] for m in o["media"]] == ["http://suite.test/video/v1/snapshots/det-42.jpg"]
    redirect = await client.get(f"{API}/media/{o['media'][0]['id']}")
    assert redirect.status_code == 307
    assert len([e for e in events if e.type == "observation.created"]) == 1


def _video_detection(**overrides: Any) -> CloudEvent:
    """``detection.created`` exactly as svc-video builds it (its own code)."""
    row = DetectionRow(
        id=str(uuid.uuid4()),
        stream_id=None,
        job_id=str(uuid.uuid4()),
        source_key="12:3",
        track_id=3,
        start_seconds=0.4,
        end_seconds=2.1,
        started_at=None,  # an uploaded video has no wall clock
        ended_at=None,
        boxes=[{"t": 0.4, "frame": 12, "x": 10.0, "y": 20.0, "w": 30.0, "h": 40.0}],
        keyframe_box=[10.0, 20.0, 30.0, 40.0],
        keyframe_seconds=0.4,
        keyframe_name="k.jpg",
        clip_name=None,
        frame_width=640,
        frame_height=480,
        created_at=datetime.now(UTC),
    )
    for key, value in overrides.items():
        setattr(row, key, value)
    subject = f"video/stream/{row.stream_id}" if row.stream_id else f"video/job/{row.job_id}"
    return new_event("video", "detection.created", detection_event_data(row), subject=subject)


async def test_video_detections_as_video_publishes_them_become_unlocated_machine_observations(
    client: httpx.AsyncClient, app: Any, events: list[CloudEvent], eventually: Any
) -> None:
    from_job = _video_detection()
    started = datetime(2024, 5, 3, 10, 15, tzinfo=UTC)
    from_stream = _video_detection(
        stream_id=str(uuid.uuid4()),
        job_id=None,
        started_at=started,
        ended_at=started + timedelta(seconds=2),
    )
    for event in (from_job, from_stream):
        await app.state.runtime.bus.publish(event)
    await eventually(lambda: len([e for e in events if e.type == "observation.created"]) == 2)
    listing = (await client.get(f"{API}/observations?project=video")).json()["items"]
    by_remark = {o["occurrenceRemarks"].split(",")[0]: o for o in listing}
    job = by_remark[f"Detection {from_job.data['detection_id']}"]
    stream = by_remark[f"Detection {from_stream.data['detection_id']}"]
    for o in (job, stream):
        assert o["basisOfRecord"] == "MachineObservation"
        assert (o["decimalLatitude"], o["decimalLongitude"]) == (None, None)
        assert "track 3" in o["occurrenceRemarks"]
    assert job["eventDate"] == from_job.time.isoformat().replace("+00:00", "Z")
    assert job["recordedBy"] == f"video:job/{from_job.data['job_id']}"
    assert stream["eventDate"] == "2024-05-03T10:15:00Z/2024-05-03T10:15:02Z"
    keyframe = f"http://suite.test/video/v1/detections/{from_stream.data['detection_id']}"
    assert [m["url"] for m in stream["media"]] == [keyframe + "/keyframe.jpg"]
    geojson = (await client.get(f"{API}/observations:export?format=geojson&project=video")).json()
    assert [f["geometry"] for f in geojson["features"]] == [None, None]
    csv_rows = list(
        csv.DictReader(
            io.StringIO((await client.get(f"{API}/observations:export?project=video")).text)
        )
    )
    assert [r["decimalLatitude"] for r in csv_rows] == ["", ""]


async def test_only_a_machine_observation_may_have_no_position(
    client: httpx.AsyncClient, observation: Body
) -> None:
    body = observation()
    del body["decimalLatitude"], body["decimalLongitude"]
    refused = (await client.post(f"{API}/observations", json=body)).json()
    assert refused["status"] == 422
    assert refused["errors"][0]["field"] == "basisOfRecord"
    assert "decimalLatitude" in refused["errors"][0]["detail"]
    half = observation(basisOfRecord="MachineObservation")
    del half["decimalLongitude"]
    halved = (await client.post(f"{API}/observations", json=half)).json()
    assert [(e["field"], halved["status"]) for e in halved["errors"]] == [("decimalLongitude", 422)]
    body["basisOfRecord"] = "MachineObservation"
    assert (await client.post(f"{API}/observations", json=body)).status_code == 201
