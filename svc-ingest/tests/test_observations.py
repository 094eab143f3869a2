"""Observations over HTTP, on SQLite and PostgreSQL: create, idempotent retries and
conflicts, validation, batches, changes with If-Match, deletion, identifications, filters and
cursor paging under concurrent inserts."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import insert, select, text

from c4c.ingest import api, schemas
from c4c.ingest.app import create_app
from c4c.ingest.models import ObservationRow
from c4c.ingest.schemas import ObservationCreate, ObservationFilter
from c4c.ingest.service import IngestService, new_row
from c4c.ingest.settings import IngestSettings
from c4c.shared.auth import PRINCIPAL_HEADER, Principal, sign_principal
from c4c.shared.bus import CloudEvent
from c4c.shared.testing import query_plan, statements_sent

API = "/ingest/v1"
Body = Callable[..., dict[str, Any]]


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    return body


def created_ids(events: list[CloudEvent], type_: str = "observation.created") -> list[str]:
    return [e.data["id"] for e in events if e.type == type_]


# --- create, retry, conflict -----------------------------------------------------------------


async def test_create_answers_201_with_location_and_darwin_core_fields(
    client: httpx.AsyncClient, observation: Body, events: list[CloudEvent], eventually: Any
) -> None:
    response = await client.post(f"{API}/observations", json=observation())
    assert response.status_code == 201, response.text
    body = response.json()
    assert response.headers["location"] == f"{API}/observations/{body['id']}"
    assert body["occurrenceID"] == f"urn:uuid:{body['id']}"
    assert body["scientificName"] == "Quercus ilex"
    assert body["geodeticDatum"] == "WGS84"
    assert body["basisOfRecord"] == "HumanObservation"
    assert body["version"] == 1

    fetched = await client.get(response.headers["location"])
    assert fetched.status_code == 200
    assert fetched.json() == body
    assert fetched.headers["etag"] == response.headers["etag"]
    for tag in (fetched.headers["etag"], "*"):
        unchanged = await client.get(response.headers["location"], headers={"If-None-Match": tag})
        assert unchanged.status_code == 304

    await eventually(lambda: created_ids(events) == [body["id"]])
    [event] = events
    assert event.subject == f"observation/{body['id']}"
    assert event.data == body


async def test_retry_with_same_id_and_body_returns_the_original(
    client: httpx.AsyncClient, observation: Body, events: list[CloudEvent], eventually: Any
) -> None:
    obs_id = str(uuid.uuid4())
    first = await client.post(f"{API}/observations", json=observation(id=obs_id))
    # Same content, different formatting and key order: still the same request.
    raw = json.dumps(dict(reversed(list(observation(id=obs_id).items()))), indent=2)
    retry = await client.post(
        f"{API}/observations", content=raw, headers={"content-type": "application/json"}
    )
    assert first.status_code == retry.status_code == 201
    assert retry.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert retry.json() == first.json()
    assert retry.json()["id"] == obs_id
    await eventually(lambda: len(events) >= 1)
    listing = await client.get(f"{API}/observations")
    assert [o["id"] for o in listing.json()["items"]] == [obs_id]
    assert created_ids(events) == [obs_id]


async def test_same_id_with_another_body_is_a_409(
    client: httpx.AsyncClient, observation: Body
) -> None:
    obs_id = str(uuid.uuid4())
    assert (
        await client.post(f"{API}/observations", json=observation(id=obs_id))
    ).status_code == 201
    again = await client.post(
        f"{API}/observations", json=observation(id=obs_id, scientificName="Quercus suber")
    )
    body = problem(again, 409)
    assert body["type"] == "urn:c4c:problem:idempotency-conflict"
    assert body["observation_id"] == obs_id
    stored = await client.get(f"{API}/observations/{obs_id}")
    assert stored.json()["scientificName"] == "Quercus ilex"


async def test_idempotency_key_makes_a_retry_safe(
    client: httpx.AsyncClient, observation: Body
) -> None:
    key = {"Idempotency-Key": f"k-{uuid.uuid4()}"}
    first = await client.post(f"{API}/observations", json=observation(), headers=key)
    retry = await client.post(f"{API}/observations", json=observation(), headers=key)
    other = await client.post(
        f"{API}/observations", json=observation(individualCount=3), headers=key
    )
    assert first.status_code == retry.status_code == 201
    assert retry.json()["id"] == first.json()["id"]
    problem(other, 409)
    without_key = await client.post(f"{API}/observations", json=observation())
    assert without_key.json()["id"] != first.json()["id"]


async def test_an_id_or_key_can_be_retried_by_its_creator_alone(
    settings: IngestSettings, observation: Body
) -> None:
    # A replay tells the caller the observation is its own (MOBIS takes it as ownership), so
    # another client sending the same id, or key, and body is refused, in a batch too.
    secret = "principal-secret-for-this-test"
    settings.principal_secret = SecretStr(secret)

    def calling_as(key_id: str, **headers: str) -> dict[str, str]:
        principal = Principal("api-key", key_id, scopes=frozenset({"*"}))
        return {PRINCIPAL_HEADER: sign_principal(principal, secret.encode()), **headers}

    obs_id, key = str(uuid.uuid4()), f"k-{uuid.uuid4()}"
    url = f"{API}/observations"
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ingest.test") as client:
            first = await client.post(url, json=observation(id=obs_id), headers=calling_as("a"))
            keyed = await client.post(
                url, json=observation(), headers=calling_as("a", **{"Idempotency-Key": key})
            )
            assert first.status_code == keyed.status_code == 201
            retry = await client.post(url, json=observation(id=obs_id), headers=calling_as("a"))
            assert retry.headers["idempotent-replayed"] == "true"
            stranger = await client.post(url, json=observation(id=obs_id), headers=calling_as("b"))
            assert problem(stranger, 409)["detail"].endswith("was created by another client.")
            keyed_stranger = await client.post(
                url, json=observation(), headers=calling_as("b", **{"Idempotency-Key": key})
            )
            assert "observation_id" not in problem(keyed_stranger, 409)
            batch = [observation(id=obs_id), observation(id=str(uuid.uuid4()))]
            theirs = await client.post(f"{url}:batch", json=batch, headers=calling_as("b"))
            ours = await client.post(f"{url}:batch", json=batch[:1], headers=calling_as("a"))
            assert [i["status"] for i in theirs.json()["items"]] == ["error", "created"]
            assert theirs.json()["items"][0]["problem"]["status"] == 409
            assert [i["status"] for i in ours.json()["items"]] == ["duplicate"]


async def test_concurrent_retries_create_one_observation(
    client: httpx.AsyncClient, observation: Body
) -> None:
    obs_id = str(uuid.uuid4())
    answers = await asyncio.gather(
        *(client.post(f"{API}/observations", json=observation(id=obs_id)) for _ in range(5))
    )
    assert [a.status_code for a in answers] == [201] * 5
    assert sum("idempotent-replayed" not in a.headers for a in answers) == 1
    assert {a.json()["id"] for a in answers} == {obs_id}


async def test_concurrent_creates_written_together_are_each_answered_alone(
    client: httpx.AsyncClient, observation: Body, events: list[CloudEvent], eventually: Any
) -> None:
    # Concurrent creates share transactions (c4c.ingest.wiring.Creations): each still gets
    # its own answer, and a shared id or key still makes one creation and a retry or a 409.
    distinct = [observation(id=str(uuid.uuid4())) for _ in range(12)]
    shared_id = str(uuid.uuid4())
    same_id = [observation(id=shared_id), observation(id=shared_id, individualCount=7)]
    key = {"Idempotency-Key": str(uuid.uuid4())}
    same_key = [observation(), observation(individualCount=3)]
    answers = await asyncio.gather(
        *(client.post(f"{API}/observations", json=body) for body in distinct + same_id),
        *(client.post(f"{API}/observations", json=body, headers=key) for body in same_key),
    )
    assert [a.status_code for a in answers[:12]] == [201] * 12
    assert [a.json()["id"] for a in answers[:12]] == [body["id"] for body in distinct]
    assert sorted(a.status_code for a in answers[12:14]) == [201, 409]
    assert sorted(a.status_code for a in answers[14:]) == [201, 409]
    stored = [a.json()["id"] for a in answers if a.status_code == 201]
    assert len(set(stored)) == 14
    await eventually(lambda: sorted(created_ids(events)) == sorted(stored))


async def test_a_create_stores_the_row_sqlalchemy_stores(
    client: httpx.AsyncClient, observation: Body, app: Any
) -> None:
    # Creates are inserted straight on the driver (SQLite) or from one JSON array
    # (PostgreSQL): every column holds what SQLAlchemy's own INSERT stores for the same values.
    fields = {
        "measurements": [{"measurementType": "PM2.5", "measurementValue": 12.5}],
        "locationObscured": True,
        "individualCount": 2,
        "eventDate": "2024-05-03T10:15:00.250+02:00",
        "occurrenceRemarks": "windy",
    }
    ours, theirs = str(uuid.uuid4()), str(uuid.uuid4())
    created = await client.post(f"{API}/observations", json=observation(id=ours, **fields))
    assert created.status_code == 201, created.text
    model = ObservationCreate.model_validate(observation(id=theirs, **fields))
    values = new_row(
        model, idempotency_key=None, digest="-", creator="anonymous", when=datetime.now(UTC)
    )
    async with app.state.runtime.db.sessions() as session, session.begin():
        await session.execute(insert(ObservationRow).values(values))
    query = text("SELECT * FROM observations WHERE id IN (:a, :b)")
    async with app.state.runtime.db.engine.connect() as conn:
        rows = {r.id: r._asdict() for r in await conn.execute(query, {"a": ours, "b": theirs})}
    differing = {"seq", "id", "occurrence_id", "body_hash", "created_at", "updated_at"}
    assert {k: v for k, v in rows[ours].items() if k not in differing} == {
        k: v for k, v in rows[theirs].items() if k not in differing
    }
    for name in ("created_at", "updated_at"):  # the same representation, another moment
        assert type(rows[ours][name]) is type(rows[theirs][name])
        assert len(str(rows[ours][name])) == len(str(rows[theirs][name]))
    assert rows[ours]["occurrence_id"] == f"urn:uuid:{ours}"


async def test_a_large_group_of_creates_is_stored_whole(app: Any, observation: Body) -> None:
    # More rows than one SQLite statement takes (SQLITE_ROWS_PER_INSERT), one of them taken.
    taken = str(uuid.uuid4())
    async with app.state.parts.unit() as service:
        await service.create(
            ObservationCreate.model_validate(observation(id=taken)), None, "anonymous"
        )
    bodies = [observation(id=str(uuid.uuid4()), individualCount=i) for i in range(299)]
    models = [ObservationCreate.model_validate(body) for body in [*bodies, observation(id=taken)]]
    async with app.state.parts.unit() as service:
        results = await service.create_many([(model, None, "anonymous") for model in models])
    assert [r.observation["id"] if r else None for r in results] == [
        *(body["id"] for body in bodies),
        None,  # its id was taken: answered as a replay, by the caller
    ]
    ids = [body["id"] for body in bodies]
    async with app.state.parts.reading() as service:
        stored = await service.repo.known(ids=ids)
    assert set(stored) == set(ids)


async def test_a_bounding_box_is_searched_by_position(app: Any, observation: Body) -> None:
    """A box with few observations in it is found through the position index, not by
    reading every observation (50 ms at 300,000 on PostgreSQL, 0.06 through the index)."""
    now = datetime.now(UTC)
    spread = random.Random(5)
    rows = [
        new_row(
            ObservationCreate.model_validate(
                observation(
                    id=str(uuid.uuid4()),
                    decimalLatitude=spread.uniform(-80, 80),
                    decimalLongitude=spread.uniform(-170, 170),
                )
            ),
            idempotency_key=None,
            digest="-",
            creator="anonymous",
            when=now,
        )
        for i in range(5000)
    ]
    db = app.state.runtime.db
    async with db.engine.begin() as conn:
        await conn.execute(insert(ObservationRow), rows)
        await conn.execute(text("ANALYZE"))
    inside = {r["id"] for r in rows if 40 <= r["latitude"] <= 45 and 0 <= r["longitude"] <= 10}
    assert inside
    async with (
        app.state.parts.reading() as service,
        statements_sent(service.repo.session) as sent,
    ):
        found = await service.repo.page(
            ObservationFilter(bbox="0,40,10,45"), sort="-created", after=None, limit=50
        )
    assert {r.id for r in found} == inside
    async with db.engine.connect() as conn:
        plan = await query_plan(conn, *sent[-1])
    assert "ix_observations_position" in plan, plan


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"decimalLatitude": 91}, "decimalLatitude"),
        ({"decimalLongitude": -180.5}, "decimalLongitude"),
        ({"license": "GPL"}, "license"),
        ({"eventDate": "2999-01-01T00:00:00Z"}, "eventDate"),
        ({"eventDate": "2024-05-03T10:15:00"}, "eventDate"),  # no offset
        ({"eventDate": "2024-13"}, "eventDate"),
        ({"eventDate": "2024-05-10/2024-05-01"}, "eventDate"),
        ({"basisOfRecord": "Guess"}, "basisOfRecord"),
        ({"countryCode": "ESP"}, "countryCode"),
        ({"surprise": 1}, "surprise"),
        ({"measurements": [{"measurementType": "pm2.5"}]}, "measurements.0.measurementValue"),
    ],
)
async def test_invalid_fields_are_named_in_a_422(
    client: httpx.AsyncClient, observation: Body, override: dict[str, Any], field: str
) -> None:
    body = problem(await client.post(f"{API}/observations", json=observation(**override)), 422)
    assert field in [e["field"] for e in body["errors"]]


async def test_missing_licence_is_a_422(client: httpx.AsyncClient, observation: Body) -> None:
    body = observation()
    del body["license"]
    errors = problem(await client.post(f"{API}/observations", json=body), 422)["errors"]
    assert [e["field"] for e in errors] == ["license"]


@pytest.mark.parametrize(
    "event_date",
    ["2024", "2024-05", "2024-05-03", "2024-05-03T08:15:00Z", "2024-05-01/2024-05-15"],
)
async def test_partial_dates_and_intervals_are_stored_as_written(
    client: httpx.AsyncClient, observation: Body, event_date: str
) -> None:
    response = await client.post(f"{API}/observations", json=observation(eventDate=event_date))
    assert response.status_code == 201, response.text
    assert response.json()["eventDate"] == event_date


def test_the_period_of_an_event_date_is_worked_out_once(
    observation: Body, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Validation works it out (and refuses a date in the future); storing takes it from there.
    worked_out: list[str] = []
    period = schemas._period

    def counted(text: str) -> Any:
        worked_out.append(text)
        return period(text)

    monkeypatch.setattr(schemas, "_period", counted)
    model = ObservationCreate.model_validate(observation(eventDate=" 2024-05-01/2024-05-15 "))
    row = new_row(
        model, idempotency_key=None, digest="-", creator="anonymous", when=datetime.now(UTC)
    )
    assert worked_out == ["2024-05-01/2024-05-15"]
    assert (row["event_date"], row["event_start"], row["event_end"]) == (
        "2024-05-01/2024-05-15",
        datetime(2024, 5, 1, tzinfo=UTC),
        datetime(2024, 5, 16, tzinfo=UTC),
    )
    assert schemas.event_period("2024-05") == (  # any text, validated or not
        datetime(2024, 5, 1, tzinfo=UTC),
        datetime(2024, 6, 1, tzinfo=UTC),
    )


async def test_hostile_bodies_get_4xx(client: httpx.AsyncClient) -> None:
    bad_json = await client.post(
        f"{API}/observations",
        content=b'{"datasetID": ',
        headers={"content-type": "application/json"},
    )
    problem(bad_json, 422)
    not_object = await client.post(f"{API}/observations", json=[1, 2])
    problem(not_object, 422)
    huge = await client.post(
        f"{API}/observations",
        content=b'{"x": "' + b"a" * (11 * 1024 * 1024) + b'"}',
        headers={"content-type": "application/json"},
    )
    problem(huge, 413)


# --- batch -----------------------------------------------------------------------------------


async def test_batch_keeps_good_items_whatever_the_bad_ones(
    client: httpx.AsyncClient, observation: Body, events: list[CloudEvent], eventually: Any
) -> None:
    existing = str(uuid.uuid4())
    await client.post(f"{API}/observations", json=observation(id=existing))
    good = [observation(id=str(uuid.uuid4()), individualCount=i) for i in range(3)]
    items = [
        good[0],
        observation(decimalLatitude=123),  # invalid
        observation(id=existing),  # retry of a stored one
        good[1],
        observation(id=existing, scientificName="Other"),  # conflict
        "not an object",
        good[2],
        good[2],  # the same id twice in one batch: the second is a duplicate
    ]
    response = await client.post(f"{API}/observations:batch", json=items)
    assert response.status_code == 200, response.text
    result = response.json()
    statuses = [o["status"] for o in result["items"]]
    assert statuses == [
        "created",
        "error",
        "duplicate",
        "created",
        "error",
        "error",
        "created",
        "duplicate",
    ]
    assert (result["created"], result["duplicates"], result["errors"]) == (3, 2, 3)
    assert result["items"][1]["problem"]["errors"][0]["field"] == "decimalLatitude"
    assert result["items"][4]["problem"]["status"] == 409
    for outcome, item in zip([result["items"][i] for i in (0, 3, 6)], good, strict=True):
        assert outcome["id"] == item["id"]
        stored = await client.get(outcome["location"])
        assert stored.json()["individualCount"] == item["individualCount"]
    want = {existing, *(g["id"] for g in good)}
    await eventually(lambda: set(created_ids(events)) == want)
    assert len(created_ids(events)) == 4


async def test_batch_repeats_of_an_id_are_judged_against_what_is_stored(
    client: httpx.AsyncClient, observation: Body, events: list[CloudEvent], eventually: Any
) -> None:
    stored, new = str(uuid.uuid4()), str(uuid.uuid4())
    await client.post(f"{API}/observations", json=observation(id=stored))
    other = observation(id=stored, scientificName="Other")
    items = [
        other,  # conflicts with the stored one
        other,  # the same again: still a conflict, not a duplicate of the item before
        observation(id=stored),  # a retry of the stored one
        observation(id=new),
        observation(id=new, scientificName="Other"),  # conflicts with the item before
        observation(id=new),  # a duplicate of it
    ]
    response = await client.post(f"{API}/observations:batch", json=items)
    assert response.status_code == 200, response.text
    outcomes = response.json()["items"]
    assert [o["status"] for o in outcomes] == [
        "error",
        "error",
        "duplicate",
        "created",
        "error",
        "duplicate",
    ]
    assert [o["problem"]["status"] for o in outcomes if o["status"] == "error"] == [409] * 3
    assert {o["id"] for o in outcomes} == {stored, new}
    assert (await client.get(f"{API}/observations/{new}")).json()["scientificName"] == (
        "Quercus ilex"
    )
    await eventually(lambda: set(created_ids(events)) == {stored, new})
    event = next(e for e in events if e.subject == f"observation/{new}")
    assert event.source == "/c4c/ingest"
    assert event.type == "observation.created"
    assert event.data["id"] == new
    assert event.data["version"] == 1


async def test_the_created_event_is_the_observation_as_read_back(
    client: httpx.AsyncClient, observation: Body, events: list[CloudEvent], eventually: Any
) -> None:
    """The event of a new observation is written from the values inserted, not from the row
    read back: it must say exactly what a read says (every column, the unset ones as null)."""
    single = await client.post(f"{API}/observations", json=observation())
    batch = await client.post(
        f"{API}/observations:batch",
        json=[
            observation(),
            observation(
                locationObscured=True,
                vernacularName=None,
                taxonRank=None,
                degreeOfEstablishment="cultivated",
                measurements=[{"measurementType": "PM2.5", "measurementValue": 12}],
            ),
        ],
    )
    ids = [single.json()["id"], *(o["id"] for o in batch.json()["items"])]
    await eventually(lambda: set(created_ids(events)) == set(ids))
    for observation_id in ids:
        event = next(e for e in events if e.subject == f"observation/{observation_id}")
        read = await client.get(f"{API}/observations/{observation_id}")
        assert event.data == read.json()


async def test_text_with_nul_characters_is_refused_on_every_database(
    client: httpx.AsyncClient, observation: Body
) -> None:
    """PostgreSQL's text cannot hold NUL: a 422 naming the field, not a 500 from the database."""
    single = await client.post(f"{API}/observations", json=observation(occurrenceRemarks="a\x00b"))
    assert problem(single, 422)["errors"][0]["field"] == "occurrenceRemarks"
    items = [observation(recordedBy="user\x00"), observation()]
    batch = await client.post(f"{API}/observations:batch", json=items)
    assert [o["status"] for o in batch.json()["items"]] == ["error", "created"]
    assert batch.json()["items"][0]["problem"]["errors"][0]["field"] == "recordedBy"


async def test_create_refuses_other_bodies_and_overlong_keys(
    client: httpx.AsyncClient, observation: Body
) -> None:
    not_json = await client.post(
        f"{API}/observations",
        content=json.dumps(observation()),
        headers={"content-type": "text/plain"},
    )
    assert problem(not_json, 415)["type"] == "urn:c4c:problem:unsupported-media-type"
    long_key = await client.post(
        f"{API}/observations", json=observation(), headers={"Idempotency-Key": "k" * 256}
    )
    assert problem(long_key, 422)["errors"][0]["in"] == "header"
    merged_type = await client.post(
        f"{API}/observations",
        content=json.dumps(observation()),
        headers={"content-type": "application/merge-patch+json"},
    )
    assert merged_type.status_code == 201, merged_type.text
    assert (await client.get(f"{API}/observations")).json()["items"][0]["id"] == (
        merged_type.json()["id"]
    )


async def test_concurrent_batches_sharing_ids_store_each_once(
    client: httpx.AsyncClient, observation: Body, events: list[Any], eventually: Any
) -> None:
    shared = [observation(id=str(uuid.uuid4())) for _ in range(40)]
    batches = [shared + [observation(id=str(uuid.uuid4())) for _ in range(5)] for _ in range(4)]
    answers = await asyncio.gather(
        *(client.post(f"{API}/observations:batch", json=b) for b in batches)
    )
    assert [a.status_code for a in answers] == [200] * 4
    results = [a.json() for a in answers]
    assert sum(r["created"] for r in results) == 40 + 4 * 5  # each shared id once
    assert sum(r["duplicates"] for r in results) == 3 * 40
    assert all(r["errors"] == 0 for r in results)
    created = {i["id"] for r in results for i in r["items"] if i["status"] == "created"}

    def announced() -> bool:
        return {e.data["id"] for e in events if e.type == "observation.created"} == created

    await eventually(announced)
    assert sum(e.type == "observation.created" for e in events) == len(created)


async def test_at_most_batch_writers_batches_are_written_at_once(
    settings: IngestSettings,
    observation: Body,
    eventually: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings.batch_writers = 2
    parsed, writing, most = 0, 0, 0
    gate = asyncio.Event()
    read_batch, create_batch = api._read_batch, IngestService.create_batch

    async def reading(*args: Any) -> Any:
        nonlocal parsed
        items = await read_batch(*args)
        parsed += 1
        return items

    async def writing_held(self: IngestService, items: Any, creator: str) -> Any:
        nonlocal writing, most
        writing += 1
        most = max(most, writing)
        await gate.wait()
        try:
            return await create_batch(self, items, creator)
        finally:
            writing -= 1

    monkeypatch.setattr(api, "_read_batch", reading)
    monkeypatch.setattr(IngestService, "create_batch", writing_held)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ingest.test") as client:
            posts = [
                asyncio.create_task(
                    client.post(f"{API}/observations:batch", json=[observation(), observation()])
                )
                for _ in range(5)
            ]
            await eventually(lambda: parsed == 5 and writing == 2)  # three wait, parsed
            gate.set()
            answers = await asyncio.gather(*posts)
    assert [a.json()["created"] for a in answers] == [2] * 5
    assert most == 2


async def test_a_batch_that_cannot_start_writing_in_time_is_told_to_come_back(
    settings: IngestSettings,
    observation: Body,
    eventually: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings.batch_writers = 1
    writing = asyncio.Event()
    gate = asyncio.Event()
    create_batch = IngestService.create_batch

    async def writing_held(self: IngestService, items: Any, creator: str) -> Any:
        writing.set()
        await gate.wait()
        return await create_batch(self, items, creator)

    monkeypatch.setattr(IngestService, "create_batch", writing_held)
    monkeypatch.setattr(api, "BATCH_TURN_SECONDS", 0.05)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ingest.test") as client:
            first = asyncio.create_task(
                client.post(f"{API}/observations:batch", json=[observation()])
            )
            await writing.wait()
            turned_away = await client.post(f"{API}/observations:batch", json=[observation()])
            gate.set()
            written = await first
            after = await client.post(f"{API}/observations:batch", json=[observation()])
    assert turned_away.status_code == 503
    assert turned_away.headers["Retry-After"] == "1"
    assert turned_away.json()["type"].endswith(":busy")
    assert written.json()["created"] == 1
    assert after.json()["created"] == 1  # the turn it did not take was not kept


async def test_ndjson_batch_is_parsed_line_by_line(
    client: httpx.AsyncClient, observation: Body
) -> None:
    lines = [json.dumps(observation(id=str(uuid.uuid4()), individualCount=i)) for i in range(50)]
    lines.insert(10, "{not json")

    async def chunks() -> Any:
        data = ("\n".join(lines) + "\n").encode()
        for start in range(0, len(data), 1000):  # lines split across chunks
            yield data[start : start + 1000]

    response = await client.post(
        f"{API}/observations:batch",
        content=chunks(),
        headers={"content-type": "application/x-ndjson"},
    )
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["created"] == 50
    assert result["errors"] == 1
    assert result["items"][10]["status"] == "error"
    assert result["items"][10]["problem"]["errors"][0]["code"] == "json_invalid"


async def test_batch_over_the_item_limit_stores_nothing(
    client: httpx.AsyncClient, observation: Body, app: Any
) -> None:
    app.state.parts.settings.batch_max_items = 5
    response = await client.post(f"{API}/observations:batch", json=[observation()] * 6)
    assert problem(response, 413)["type"] == "urn:c4c:problem:batch-too-large"
    assert (await client.get(f"{API}/observations")).json()["items"] == []


async def test_batch_must_be_an_array(client: httpx.AsyncClient, observation: Body) -> None:
    problem(await client.post(f"{API}/observations:batch", json=observation()), 400)
    problem(
        await client.post(
            f"{API}/observations:batch", content=b"x", headers={"content-type": "text/plain"}
        ),
        415,
    )


# --- change, delete, identify ----------------------------------------------------------------


async def test_patch_needs_the_current_etag(
    client: httpx.AsyncClient, observation: Body, events: list[CloudEvent], eventually: Any
) -> None:
    created = await client.post(f"{API}/observations", json=observation())
    url, tag = created.headers["location"], created.headers["etag"]
    patch = {"individualCount": 4, "vernacularName": None}
    problem(await client.patch(url, json=patch), 428)

    changed = await client.patch(url, json=patch, headers={"If-Match": tag})
    assert changed.status_code == 200, changed.text
    assert changed.json()["individualCount"] == 4
    assert changed.json()["vernacularName"] is None
    assert changed.json()["version"] == 2
    assert changed.headers["etag"] != tag

    stale = await client.patch(url, json={"individualCount": 9}, headers={"If-Match": tag})
    assert problem(stale, 412)["current_etag"] == changed.headers["etag"]
    invalid = await client.patch(
        url, json={"decimalLatitude": 100}, headers={"If-Match": changed.headers["etag"]}
    )
    assert problem(invalid, 422)["errors"][0]["field"] == "decimalLatitude"

    await eventually(lambda: any(e.type == "observation.updated" for e in events))
    [update] = [e for e in events if e.type == "observation.updated"]
    assert update.data["changed"] == {"individualCount": 4, "vernacularName": None}


async def test_delete_is_soft_with_a_tombstone_event(
    client: httpx.AsyncClient, observation: Body, events: list[CloudEvent], eventually: Any
) -> None:
    created = await client.post(f"{API}/observations", json=observation())
    obs_id = created.json()["id"]
    assert (await client.delete(created.headers["location"])).status_code == 204
    problem(await client.get(created.headers["location"]), 410)
    problem(await client.delete(created.headers["location"]), 410)
    assert (await client.get(f"{API}/observations")).json()["items"] == []
    tombstones = (await client.get(f"{API}/observations?includeDeleted=true")).json()["items"]
    assert [(t["id"], t["deleted"]) for t in tombstones] == [(obs_id, True)]
    await eventually(lambda: any(e.type == "observation.deleted" for e in events))
    [tombstone] = [e for e in events if e.type == "observation.deleted"]
    assert tombstone.data["id"] == obs_id


async def test_unknown_observation_is_a_404(client: httpx.AsyncClient) -> None:
    problem(await client.get(f"{API}/observations/{uuid.uuid4()}"), 404)
    problem(await client.patch(f"{API}/observations/x", json={}, headers={"If-Match": "*"}), 404)


async def test_community_identifications_are_listed_and_announced(
    client: httpx.AsyncClient, observation: Body, events: list[CloudEvent], eventually: Any
) -> None:
    created = await client.post(f"{API}/observations", json=observation())
    url = created.headers["location"]
    ident = {
        "identifiedBy": "expert-7",
        "scientificName": "Quercus rotundifolia",
        "taxonRank": "species",
    }
    answer = await client.post(f"{url}/identifications", json=ident)
    assert answer.status_code == 201, answer.text
    assert answer.json()["kind"] == "human"
    stored = (await client.get(url)).json()
    assert [i["scientificName"] for i in stored["identifications"]] == ["Quercus rotundifolia"]
    await eventually(lambda: any(e.type == "observation.updated" for e in events))
    problem(await client.post(f"{url}/identifications", json={"identifiedBy": "x"}), 422)


# --- listing ---------------------------------------------------------------------------------


async def test_filters(client: httpx.AsyncClient, observation: Body) -> None:
    made = {
        "oak": observation(scientificName="Quercus ilex", datasetID="a", recordedBy="u1"),
        "cork": observation(
            scientificName="Quercus suber", vernacularName="Cork oak", datasetID="b"
        ),
        "daisy": observation(
            scientificName="Bellis perennis",
            vernacularName="Daisy",
            eventDate="2023-06",
            decimalLatitude=-33.9,
            decimalLongitude=151.2,
        ),
        "fiji": observation(
            scientificName="Cocos nucifera", decimalLatitude=-17.7, decimalLongitude=179.9
        ),
        "year": observation(scientificName="Taraxacum officinale", eventDate="2024"),
    }
    ids = {}
    for name, body in made.items():
        ids[(await client.post(f"{API}/observations", json=body)).json()["id"]] = name

    async def names(query: str) -> set[str]:
        response = await client.get(f"{API}/observations?{query}")
        assert response.status_code == 200, response.text
        return {ids[o["id"]] for o in response.json()["items"]}

    assert await names("name=quercus") == {"oak", "cork"}
    assert await names("name=CORK") == {"cork"}
    assert await names("name=quercus%20s") == {"cork"}
    assert await names("name=%25") == set()  # a LIKE wildcard is a plain character
    assert await names("project=b") == {"cork"}
    assert await names("recordedBy=u1") == {"oak"}
    assert await names("bbox=150,-35,152,-33") == {"daisy"}
    assert await names("bbox=179,-18,-179,-17") == {"fiji"}  # across the antimeridian
    assert await names("eventDateFrom=2024-05-01&eventDateTo=2024-05-31") == {"oak", "cork", "fiji"}
    assert await names("eventDateFrom=2023-01-01&eventDateTo=2023-12-31") == {"daisy"}
    assert await names("eventDateFrom=2024-01-01&eventDateTo=2024-12-31") == {
        "oak",
        "cork",
        "fiji",
        "year",
    }
    assert await names("hasMedia=false") == set(made)
    assert await names("hasMedia=true") == set()
    later = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    assert await names(f"updatedSince={later.replace('+', '%2B')}") == set()
    for bad in (
        "bbox=1,2,3",
        "bbox=0,50,1,40",
        "limit=0",
        "sort=name",
        "unknown=1",
        "updatedSince=2024-01-01T00:00:00",
    ):
        problem(await client.get(f"{API}/observations?{bad}"), 422)
    problem(await client.get(f"{API}/observations?cursor=garbage"), 400)


@pytest.mark.parametrize("database", ["postgres"], indirect=True)
async def test_the_name_filter_reads_an_index_on_postgresql(app: Any) -> None:
    # A prefix LIKE under a collation other than C is served by pattern ops only; a plain
    # B-tree index left the filter reading the whole table.
    async with app.state.parts.reading() as service:
        conditions = service.repo._conditions(ObservationFilter(name="Quer"))
        query = select(ObservationRow.id).where(*conditions)
        sql = query.compile(
            dialect=service.repo.session.bind.dialect, compile_kwargs={"literal_binds": True}
        )
        await service.repo.session.execute(text("SET LOCAL enable_seqscan = off"))
        plan = "\n".join((await service.repo.session.execute(text(f"EXPLAIN {sql}"))).scalars())
    for column in ("scientific_name_lower", "vernacular_name_lower"):
        assert f"Index Cond: ((({column})::text ~>=~ 'quer'::text)" in plan, plan


async def test_quality_grade_filter_after_scoring(
    client: httpx.AsyncClient, observation: Body, app: Any, eventually: Any
) -> None:
    obs_id = (await client.post(f"{API}/observations", json=observation())).json()["id"]
    bus = app.state.runtime.bus
    from c4c.shared.bus import new_event

    await bus.publish(
        new_event(
            "quality",
            "observation.scored",
            {"observation_id": obs_id, "score": 0.9, "grade": "research", "flags": ["ok"]},
        )
    )

    async def graded() -> bool:
        items = (await client.get(f"{API}/observations?qualityGrade=research")).json()["items"]
        return [o["id"] for o in items] == [obs_id]

    await eventually(graded)


@pytest.mark.parametrize("sort", ["-created", "created", "eventDate", "-updated"])
async def test_cursor_paging_is_stable_under_concurrent_inserts(
    client: httpx.AsyncClient, observation: Body, sort: str
) -> None:
    before = []
    for i in range(23):
        body = observation(eventDate=f"2024-05-{i % 9 + 1:02d}", individualCount=i)
        before.append((await client.post(f"{API}/observations", json=body)).json()["id"])
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        query = f"sort={sort}&limit=5" + (f"&cursor={cursor}" if cursor else "")
        page = (await client.get(f"{API}/observations?{query}")).json()
        seen += [o["id"] for o in page["items"]]
        pages += 1
        # Others keep writing while we page.
        await asyncio.gather(
            *(
                client.post(f"{API}/observations", json=observation(eventDate="2024-05-05"))
                for _ in range(3)
            )
        )
        cursor = page["next"]
        if cursor is None:
            break
        assert pages < 100
    assert len(seen) == len(set(seen)), "an observation was listed twice"
    assert set(before) <= set(seen), "an observation that existed before paging was skipped"


# --- hostile input ---------------------------------------------------------------------------

EDGE_DATES = ("9999-12-31", "2026-01-01/9999-12-31", "9999-12-31T23:59:59-14:00")


async def test_dates_at_the_end_of_the_calendar_are_a_422_naming_the_field(
    client: httpx.AsyncClient, observation: Body
) -> None:
    stored = await client.post(f"{API}/observations", json=observation())
    for edge in EDGE_DATES:
        single = await client.post(f"{API}/observations", json=observation(eventDate=edge))
        assert problem(single, 422)["errors"][0]["field"] == "eventDate"
        batch = await client.post(
            f"{API}/observations:batch", json=[observation(eventDate=edge), observation()]
        )
        assert [o["status"] for o in batch.json()["items"]] == ["error", "created"]
        assert batch.json()["items"][0]["problem"]["errors"][0]["field"] == "eventDate"
        patched = await client.patch(
            f"{API}/observations/{stored.json()['id']}",
            json={"eventDate": edge},
            headers={"If-Match": stored.headers["etag"]},
        )
        assert problem(patched, 422)["errors"][0]["field"] == "eventDate"
    for query in (
        "eventDateTo=9999-12-31",
        "eventDateTo=9999-12-31T23:00:00-14:00",
        "updatedSince=9999-12-31T23:00:00-14:00",
    ):
        for path in ("/observations", "/observations:export"):
            field = query.split("=")[0]
            answer = await client.get(f"{API}{path}?{query}")
            assert problem(answer, 422)["errors"][0]["field"] == field
    late = await client.post(
        f"{API}/observations/{stored.json()['id']}/identifications",
        json={
            "identifiedBy": "u",
            "scientificName": "Quercus ilex",
            "dateIdentified": "0001-01-01T00:00:00+14:00",
        },
    )
    assert problem(late, 422)["errors"][0]["field"] == "dateIdentified"


async def test_json_too_deep_or_with_huge_integers_is_a_400(
    client: httpx.AsyncClient, observation: Body
) -> None:
    huge = json.dumps([observation()])[:-2].encode() + b', "individualCount": ' + b"9" * 5000
    for body in (b"[" * 2000 + b"]" * 2000, huge + b"}]"):
        answer = await client.post(
            f"{API}/observations:batch", content=body, headers={"content-type": "application/json"}
        )
        assert "not valid JSON" in problem(answer, 400)["detail"]
    assert (await client.get(f"{API}/observations")).json()["items"] == []


async def test_cursors_out_of_range_are_a_400(client: httpx.AsyncClient) -> None:
    def cursor(*payload: Any) -> str:
        return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")

    when = "2026-01-01T00:00:00+00:00"
    for bad in (
        cursor("-created", when, 99999999999999999999),
        cursor("-created", when, -99999999999999999999),
        cursor("-created", when, -1),
        cursor("-created", when, True),
        cursor("-created", "2026-01-01T00:00:00", 1),
        cursor("-created", "9999-12-31T23:59:59-14:00", 1),
    ):
        answer = await client.get(f"{API}/observations?cursor={bad}")
        assert problem(answer, 400)["type"] == "urn:c4c:problem:invalid-cursor"
    good = await client.get(f"{API}/observations?cursor={cursor('-created', when, 1)}")
    assert good.status_code == 200


async def test_reads_do_not_queue_behind_a_write_transaction(
    client: httpx.AsyncClient, app: Any, observation: Body
) -> None:
    """GETs read a snapshot beside the writer (on SQLite, the writer's one connection is
    taken while a write transaction is open)."""
    location = (await client.post(f"{API}/observations", json=observation())).headers["location"]
    async with app.state.runtime.db.sessions() as session, session.begin():
        await session.execute(select(ObservationRow.seq).limit(1))  # the transaction begins
        for url in (location, f"{API}/observations", f"{API}/observations:export"):
            answer = await asyncio.wait_for(client.get(url), 10)
            assert answer.status_code == 200, answer.text
