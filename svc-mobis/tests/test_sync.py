"""Offline sync into a real ingest (through its API), resumable media, my observations
updated by score and identification events, notifications, ownership and forget-me."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY
from sqlalchemy import Row, create_engine, literal, select

from c4c.mobis.remote import UpstreamFailed
from c4c.mobis.repository import MEDIA, Repository, utc
from c4c.mobis.schemas import MyObservationPage
from c4c.mobis.service.observations import ShownItems, StoredMarks, shown_item
from c4c.shared.bus import new_event
from c4c.shared.inbox import ProcessedEvent

PASSWORD = "correct horse battery"
Observation = Callable[..., dict[str, Any]]


def item(body: dict[str, Any], photos: list[bytes] = (), **extra: Any) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "createdAt": "2024-05-03T08:15:00Z",
        "formVersion": "plant-v1",
        "observation": body,
        "media": [
            {
                "id": str(uuid.uuid4()),
                "sha256": hashlib.sha256(p).hexdigest(),
                "size": len(p),
                "contentType": "image/png",
            }
            for p in photos
        ],
    } | extra


def png(seed: int) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (seed % 256, 80, 120)).save(buffer, "PNG")
    return buffer.getvalue()


async def test_sync_creates_once_and_retries_are_duplicates(
    anonymous: httpx.AsyncClient,
    signed_up: Any,
    observation: Observation,
    ingest_client: httpx.AsyncClient,
) -> None:
    _, me = await signed_up("ha@example.org")
    readings = [
        {"measurementType": "odour intensity", "measurementValue": 3, "measurementUnit": "level"}
    ]
    items = [
        item(observation(), [png(1)]),
        item(observation(datasetID="odourcollect", measurements=readings)),
        item(observation(decimalLatitude=123)),  # invalid: ingest says why
    ]
    first = await anonymous.post("/mobis/v1/sync", json={"observations": items}, headers=me)
    assert first.status_code == 200, first.text
    outcomes = first.json()["items"]
    assert [o["status"] for o in outcomes] == ["created", "created", "error"]
    assert outcomes[0]["missingMedia"] == [items[0]["media"][0]["id"]]
    assert "/decimalLatitude" in str(outcomes[2]["problem"])
    again = await anonymous.post("/mobis/v1/sync", json={"observations": items[:2]}, headers=me)
    assert [o["status"] for o in again.json()["items"]] == ["duplicate", "duplicate"]
    stored = (await ingest_client.get(f"/ingest/v1/observations/{items[1]['id']}")).json()
    assert stored["recordedBy"] == "ha"
    assert stored["measurements"][0]["measurementValue"] == 3
    listing = (await ingest_client.get("/ingest/v1/observations?recordedBy=ha")).json()
    assert len(listing["items"]) == 2


async def test_a_stale_edit_is_a_conflict_carrying_the_server_version(
    anonymous: httpx.AsyncClient, signed_up: Any, observation: Observation
) -> None:
    _, me = await signed_up("ib@example.org")
    new = item(observation())
    await anonymous.post("/mobis/v1/sync", json={"observations": [new]}, headers=me)
    edit = new | {"observation": observation(individualCount=3), "baseVersion": 1}
    done = await anonymous.post("/mobis/v1/sync", json={"observations": [edit]}, headers=me)
    assert done.json()["items"][0]["status"] == "updated"
    assert done.json()["items"][0]["version"] == 2
    retry = await anonymous.post("/mobis/v1/sync", json={"observations": [edit]}, headers=me)
    assert retry.json()["items"][0]["status"] == "duplicate"
    stale = new | {"observation": observation(individualCount=9), "baseVersion": 1}
    conflict = (
        await anonymous.post("/mobis/v1/sync", json={"observations": [stale]}, headers=me)
    ).json()["items"][0]
    assert conflict["status"] == "conflict"
    assert conflict["serverVersion"]["version"] == 2
    assert conflict["serverVersion"]["individualCount"] == 3


async def test_media_resume_after_a_drop_then_reach_ingest(
    anonymous: httpx.AsyncClient,
    signed_up: Any,
    observation: Observation,
    ingest_client: httpx.AsyncClient,
) -> None:
    _, me = await signed_up("jo@example.org")
    photo = png(7) + b"\0" * 5000  # trailing bytes after IEND are still a PNG
    new = item(observation(), [photo])
    await anonymous.post("/mobis/v1/sync", json={"observations": [new]}, headers=me)
    media_id = new["media"][0]["id"]
    half = len(photo) // 2
    part = await anonymous.put(
        f"/mobis/v1/media/{media_id}",
        content=photo[:half],
        headers=me | {"Content-Range": f"bytes 0-{half - 1}/{len(photo)}"},
    )
    assert part.status_code == 202, part.text
    # The connection drops here; the app asks where to resume.
    state = await anonymous.get(f"/mobis/v1/media/{media_id}", headers=me)
    assert state.json()["received"] == half
    assert state.headers["upload-offset"] == str(half)
    wrong = await anonymous.put(
        f"/mobis/v1/media/{media_id}",
        content=photo[:10],
        headers=me | {"Content-Range": f"bytes 0-9/{len(photo)}"},
    )
    assert wrong.status_code == 409
    assert wrong.json()["received"] == half
    rest = await anonymous.put(
        f"/mobis/v1/media/{media_id}",
        content=photo[half:],
        headers=me | {"Content-Range": f"bytes {half}-{len(photo) - 1}/{len(photo)}"},
    )
    assert rest.status_code == 200, rest.text
    assert rest.json()["stored"] is True
    missing = await anonymous.get(
        f"/mobis/v1/me/observations/{new['id']}/missing-media", headers=me
    )
    assert missing.json()["missing"] == []
    stored = (await ingest_client.get(f"/ingest/v1/observations/{new['id']}")).json()
    assert [m["id"] for m in stored["media"]] == [media_id]
    assert stored["media"][0]["sha256"] == hashlib.sha256(photo).hexdigest()


async def test_a_corrupted_upload_is_refused_and_restarts(
    anonymous: httpx.AsyncClient, signed_up: Any, observation: Observation
) -> None:
    _, me = await signed_up("ka@example.org")
    photo = png(9)
    new = item(observation(), [photo])
    await anonymous.post("/mobis/v1/sync", json={"observations": [new]}, headers=me)
    media_id = new["media"][0]["id"]
    bad = await anonymous.put(f"/mobis/v1/media/{media_id}", content=b"x" * len(photo), headers=me)
    assert bad.status_code == 422
    assert bad.json()["type"] == "urn:c4c:problem:checksum-mismatch"
    state = await anonymous.get(f"/mobis/v1/media/{media_id}", headers=me)
    assert state.json()["received"] == 0


async def test_scores_and_identifications_reach_my_observations_and_notifications(
    app: FastAPI,
    anonymous: httpx.AsyncClient,
    signed_up: Any,
    observation: Observation,
    eventually: Any,
) -> None:
    _, me = await signed_up("lu@example.org")
    items = [item(observation()) for _ in range(3)]
    await anonymous.post("/mobis/v1/sync", json={"observations": items}, headers=me)
    bus = app.state.runtime.bus
    target = items[1]["id"]
    scored = new_event(
        "quality",
        "observation.scored",
        {
            "observation_id": target,
            "observation_version": 1,
            "assessment_id": "a1",
            "score": 62,
            "grade": "needs_id",
            "flags": [
                {
                    "code": "blurry",
                    "severity": "warning",
                    "message": "Blurry photo",
                    "evidence": {},
                    "effect": 20,
                    "tip": "Hold the phone still: the photo is blurry.",
                }
            ],
            "ruleset": {"project": "natusfera", "version": "1"},
        },
    )
    identified = new_event(
        "plantid",
        "observation.identified",
        {
            "observation_id": target,
            "project": "natusfera",
            "rejected": False,
            "candidates": [
                {
                    "scientificName": "Bellis perennis",
                    "score": 0.91,
                    "taxonRank": "species",
                    "family": "Asteraceae",
                    "gbifId": 3117424,
                }
            ],
            "model_version": "m1",
            "gallery_version": 3,
            "best_similarity": 0.8,
        },
    )
    await bus.publish(scored)
    await bus.publish(scored)  # redelivered: applied once
    await bus.publish(identified)

    async def both() -> bool:
        page = (await anonymous.get("/mobis/v1/me/notifications", headers=me)).json()
        return len(page["items"]) == 2

    await eventually(both, timeout=10)
    page = await anonymous.get("/mobis/v1/me/observations", headers=me)
    body = page.json()
    mine = {o["id"]: o for o in body["items"]}
    assert mine[target]["status"] == "identified"
    assert mine[target]["scored"]
    assert mine[target]["quality"]["tips"] == ["Hold the phone still: the photo is blurry."]
    assert mine[target]["suggestions"][0]["scientificName"] == "Bellis perennis"
    assert mine[items[0]["id"]]["status"] == "uploaded"
    assert (
        await anonymous.get(
            "/mobis/v1/me/observations", headers=me | {"If-None-Match": page.headers["etag"]}
        )
    ).status_code == 304
    first = (await anonymous.get("/mobis/v1/me/observations?limit=2", headers=me)).json()
    rest = (
        await anonymous.get(f"/mobis/v1/me/observations?limit=2&cursor={first['next']}", headers=me)
    ).json()
    assert len(first["items"]) == 2
    assert len(rest["items"]) == 1
    assert rest["next"] is None
    assert {o["id"] for o in first["items"] + rest["items"]} == {i["id"] for i in items}
    huge = base64.urlsafe_b64encode(b"o:99999999999999999999").decode()  # beyond int64
    for cursor in ("garbage!", huge):
        bad = await anonymous.get(f"/mobis/v1/me/observations?cursor={cursor}", headers=me)
        assert bad.status_code == 400, bad.text


async def test_nobody_reaches_another_users_observations_or_media(
    anonymous: httpx.AsyncClient, signed_up: Any, observation: Observation
) -> None:
    _, alice = await signed_up("ma@example.org")
    _, mallory = await signed_up("ne@example.org")
    photo = png(3)
    theirs = item(observation(), [photo])
    await anonymous.post("/mobis/v1/sync", json={"observations": [theirs]}, headers=alice)
    oid, mid = theirs["id"], theirs["media"][0]["id"]
    assert (
        await anonymous.get(f"/mobis/v1/me/observations/{oid}", headers=mallory)
    ).status_code == 404
    assert (
        await anonymous.get(f"/mobis/v1/me/observations/{oid}/missing-media", headers=mallory)
    ).status_code == 404
    assert (await anonymous.get(f"/mobis/v1/media/{mid}", headers=mallory)).status_code == 404
    upload = await anonymous.put(f"/mobis/v1/media/{mid}", content=photo, headers=mallory)
    assert upload.status_code == 404
    # Re-sync with alice's ids: neither create, edit nor duplicate.
    for attempt in (
        theirs,
        theirs | {"baseVersion": 1, "observation": observation(individualCount=666)},
    ):
        answer = await anonymous.post(
            "/mobis/v1/sync", json={"observations": [attempt]}, headers=mallory
        )
        assert answer.json()["items"][0]["status"] == "error"
        assert answer.json()["items"][0]["problem"]["status"] == 409
    hijack = item(observation(), [photo])
    hijack["media"][0]["id"] = mid
    answer = await anonymous.post(
        "/mobis/v1/sync", json={"observations": [hijack]}, headers=mallory
    )
    assert answer.json()["items"][0]["status"] == "error"
    mine = (await anonymous.get("/mobis/v1/me/observations", headers=mallory)).json()
    assert mine["items"] == []


async def test_an_observation_ingest_has_from_another_client_is_nobodys_to_claim(
    anonymous: httpx.AsyncClient,
    signed_up: Any,
    observation: Observation,
    importer: httpx.AsyncClient,
) -> None:
    # An importer's observation is public; copying it, id and all, into a sync is exactly
    # the body MOBIS would send for it when the display name matches its recordedBy.
    _, mallory = await signed_up("importer-1@example.org")
    copied = item(observation())
    imported = await importer.post(
        "/ingest/v1/observations",
        json=copied["observation"] | {"id": copied["id"], "recordedBy": "importer-1"},
    )
    assert imported.status_code == 201, imported.text
    answer = await anonymous.post(
        "/mobis/v1/sync", json={"observations": [copied]}, headers=mallory
    )
    outcome = answer.json()["items"][0]
    assert (outcome["status"], outcome["problem"]["status"]) == ("error", 409)
    mine = await anonymous.get(f"/mobis/v1/me/observations/{copied['id']}", headers=mallory)
    assert mine.status_code == 404
    edit = copied | {"baseVersion": 1, "observation": observation(individualCount=666)}
    answer = await anonymous.post("/mobis/v1/sync", json={"observations": [edit]}, headers=mallory)
    assert answer.json()["items"][0]["status"] == "error"
    stored = (await importer.get(f"/ingest/v1/observations/{copied['id']}")).json()
    assert (stored["recordedBy"], stored.get("individualCount")) == ("importer-1", None)


async def test_forget_me_pseudonymises_observations_in_ingest(
    app: FastAPI,
    anonymous: httpx.AsyncClient,
    signed_up: Any,
    observation: Observation,
    ingest_client: httpx.AsyncClient,
    eventually: Any,
) -> None:
    _, me = await signed_up("olga.personal.name@example.org")
    new = item(observation())
    await anonymous.post("/mobis/v1/sync", json={"observations": [new]}, headers=me)
    url = f"/ingest/v1/observations/{new['id']}"
    assert (await ingest_client.get(url)).json()["recordedBy"] == "olga.personal.name"
    gone = await anonymous.request(
        "DELETE", "/mobis/v1/me", json={"password": PASSWORD}, headers=me
    )
    assert gone.status_code == 204

    async def pseudonymised() -> bool:
        return (await ingest_client.get(url)).json()["recordedBy"].startswith("anonymous-")

    await eventually(pseudonymised, timeout=10)
    kept = (await ingest_client.get(url)).json()
    assert kept["license"] == "CC-BY"
    assert "olga" not in str(kept)

    async def forgotten_here() -> bool:
        async with app.state.runtime.db.sessions() as session:
            return not await Repository(session).awaiting_pseudonym(10)

    await eventually(forgotten_here, timeout=10)
    # Someone with her old display name sends her public observation, id and body: it is
    # exactly what MOBIS sent for her, and still nobody's to claim.
    _, mallory = await signed_up("olga.personal.name@elsewhere.example")
    answer = await anonymous.post("/mobis/v1/sync", json={"observations": [new]}, headers=mallory)
    outcome = answer.json()["items"][0]
    assert (outcome["status"], outcome["problem"]["status"]) == ("error", 409)
    mine = await anonymous.get(f"/mobis/v1/me/observations/{new['id']}", headers=mallory)
    assert mine.status_code == 404


async def test_bad_sync_requests_are_problems(
    anonymous: httpx.AsyncClient, signed_up: Any, observation: Observation
) -> None:
    _, me = await signed_up("sa@example.org")
    cases = [
        ({"observations": [item(observation(recordedBy="someone else"))]}, 422),
        ({"observations": [item(observation()) for _ in range(201)]}, 413),
        ({"observations": []}, 422),
        ({"observations": [item(observation()) | {"id": "not-a-uuid"}]}, 422),
        ({"observations": [item(observation(), [b"x"]) | {"baseVersion": -1}]}, 422),
    ]
    for body, status in cases:
        answer = await anonymous.post("/mobis/v1/sync", json=body, headers=me)
        assert answer.status_code == status, answer.text
        assert answer.headers["content-type"] == "application/problem+json"
    huge = item(observation(), [b"x"])
    huge["media"][0]["size"] = 99999999999999999999  # beyond the database's integers
    bad_ints = [
        ({"observations": [huge]}, "/mobis/v1/sync"),
        ({"observations": [item(observation()) | {"baseVersion": 2**63}]}, "/mobis/v1/sync"),
        ({"upTo": 99999999999999999999}, "/mobis/v1/me/notifications:read"),
    ]
    for body, path in bad_ints:
        answer = await anonymous.post(path, json=body, headers=me)
        assert answer.status_code == 422, answer.text
        assert answer.headers["content-type"] == "application/problem+json"
    for query in ("after=9223372036854775808", "after=-1"):
        answer = await anonymous.get(f"/mobis/v1/me/notifications?{query}", headers=me)
        assert answer.status_code == 422, answer.text
    garbage = await anonymous.post(
        "/mobis/v1/sync", content=b"{not json", headers=me | {"Content-Type": "application/json"}
    )
    assert garbage.status_code == 422
    assert (await anonymous.get("/mobis/v1/me/observations", headers=me)).json()["items"] == []


async def test_events_arriving_together_are_applied_together_and_a_bad_one_alone_is_parked(
    app: FastAPI,
    anonymous: httpx.AsyncClient,
    signed_up: Any,
    observation: Observation,
    eventually: Any,
) -> None:
    """Events handed over at once are applied in batches: each once (a redelivery in the
    same batch too), in the order they came; an unreadable one fails alone and is parked,
    the others of its batch still apply. One of an observation no app synced is let go
    without a record (MOBIS hears of every observation in the suite)."""
    _, me = await signed_up("batch@example.org")
    items = [item(observation()) for _ in range(12)]
    await anonymous.post("/mobis/v1/sync", json={"observations": items}, headers=me)
    runtime = app.state.runtime

    def scored(observation_id: str, score: float) -> Any:
        data = {"observation_id": observation_id, "score": score, "grade": "casual", "flags": []}
        return new_event("quality", "observation.scored", data)

    events = [scored(i["id"], 50) for i in items]
    events.append(events[0])  # a redelivery among the others
    events.append(new_event("ingest", "observation.updated", {"id": items[1]["id"], "version": 3}))
    events.append(new_event("quality", "observation.scored", {"score": "not an observation"}))
    stranger = scored(str(uuid.uuid4()), 40)
    events.append(stranger)
    await asyncio.gather(*(runtime.bus.publish(e) for e in events))

    async def parked() -> bool:
        return len(await runtime.bus.dead_letters(runtime.queue)) == 1

    await eventually(parked, timeout=30)
    mine = {
        o["id"]: o
        for o in (await anonymous.get("/mobis/v1/me/observations", headers=me)).json()["items"]
    }
    assert all(mine[i["id"]]["scored"] for i in items)
    assert mine[items[1]["id"]]["version"] == 3
    notes = (await anonymous.get("/mobis/v1/me/notifications?limit=100", headers=me)).json()
    assert len(notes["items"]) == len(items)  # the redelivered score notified once
    async with runtime.db.sessions() as session:
        recorded = set((await session.execute(select(ProcessedEvent.event_id))).scalars())
    assert {e.id for e in events[:12]} <= recorded
    assert stranger.id not in recorded


async def test_a_score_that_arrives_before_ingest_answers_the_sync_is_kept(
    app: FastAPI,
    anonymous: httpx.AsyncClient,
    signed_up: Any,
    observation: Observation,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under load quality may score an observation before ingest's answer to the sync gets
    back to MOBIS: the score is kept, not dropped for an observation not known yet."""
    ingest = app.state.parts.observations.ingest
    create_batch = ingest.create_batch

    async def scored_at_once(observations: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        answers = await create_batch(observations)
        for body in observations:
            data = {"observation_id": body["id"], "score": 71, "grade": "casual", "flags": []}
            # The in-process bus returns once every consumer has handled the event.
            await app.state.runtime.bus.publish(new_event("quality", "observation.scored", data))
        return answers

    monkeypatch.setattr(ingest, "create_batch", scored_at_once)
    _, me = await signed_up("early@example.org")
    new = item(observation())
    answer = await anonymous.post("/mobis/v1/sync", json={"observations": [new]}, headers=me)
    assert answer.json()["items"][0]["status"] == "created", answer.text
    mine = (await anonymous.get("/mobis/v1/me/observations", headers=me)).json()["items"]
    assert [(o["id"], o["scored"], o["quality"]["score"]) for o in mine] == [(new["id"], True, 71)]


async def test_a_sync_cut_short_before_ingest_answered_is_sent_again_by_its_retry(
    app: FastAPI,
    anonymous: httpx.AsyncClient,
    signed_up: Any,
    observation: Observation,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reserved, then the call to ingest fails: the retry sends it, rather than answering
    "duplicate", which would tell the app that an observation ingest never got is safe."""
    ingest = app.state.parts.observations.ingest
    _, me = await signed_up("cut@example.org")
    new = item(observation())

    async def unreachable(observations: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        raise UpstreamFailed("The observation store is unreachable (ConnectError).")

    with monkeypatch.context() as patched:
        patched.setattr(ingest, "create_batch", unreachable)
        failed = await anonymous.post("/mobis/v1/sync", json={"observations": [new]}, headers=me)
        assert failed.status_code == 502, failed.text
    assert (await anonymous.get("/mobis/v1/me/observations", headers=me)).json()["items"] == []
    retry = await anonymous.post("/mobis/v1/sync", json={"observations": [new]}, headers=me)
    assert retry.json()["items"][0]["status"] == "created", retry.text
    mine = (await anonymous.get("/mobis/v1/me/observations", headers=me)).json()["items"]
    assert [o["id"] for o in mine] == [new["id"]]


async def test_a_media_id_announced_twice_or_too_large_fails_only_its_item(
    anonymous: httpx.AsyncClient,
    signed_up: Any,
    observation: Observation,
    settings: Any,
) -> None:
    _, me = await signed_up("md@example.org")
    first, second, within = (item(observation(), [png(1)]) for _ in range(3))
    second["media"] = first["media"]  # the same file claimed by another observation
    within["media"] = first["media"] * 2  # and twice by one
    large = item(observation(), [png(2)])
    large["media"][0]["size"] = settings.media_max_bytes + 1  # could never be uploaded
    answer = await anonymous.post(
        "/mobis/v1/sync", json={"observations": [first, second, within, large]}, headers=me
    )
    assert answer.status_code == 200, answer.text
    outcomes = answer.json()["items"]
    assert [o["status"] for o in outcomes] == ["created", "error", "error", "error"]
    assert outcomes[1]["problem"]["type"] == "urn:c4c:problem:duplicate-media"
    assert outcomes[2]["problem"]["type"] == "urn:c4c:problem:duplicate-media"
    assert outcomes[3]["problem"]["status"] == 422
    assert "media[0].size" in outcomes[3]["problem"]["detail"]
    mine = (await anonymous.get("/mobis/v1/me/observations", headers=me)).json()["items"]
    assert [o["id"] for o in mine] == [first["id"]]


async def test_a_media_id_taken_meanwhile_by_another_sync_fails_only_its_item(
    anonymous: httpx.AsyncClient,
    signed_up: Any,
    observation: Observation,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two syncs at once announcing one media id for different observations: the one that
    reserves second gets id-taken for that item, not a 500."""
    _, me = await signed_up("race@example.org")
    first = item(observation(), [png(3)])
    assert (
        await anonymous.post("/mobis/v1/sync", json={"observations": [first]}, headers=me)
    ).json()["items"][0]["status"] == "created"

    # The second sync looked before the first had reserved: it saw no such media id.
    async def nothing_known(self: Repository, media_ids: Sequence[str]) -> dict[str, Any]:
        return {}

    monkeypatch.setattr(Repository, "media", nothing_known)
    late = item(observation(), [png(3)])
    late["media"][0]["id"] = first["media"][0]["id"]
    other = item(observation())
    answer = await anonymous.post(
        "/mobis/v1/sync", json={"observations": [late, other]}, headers=me
    )
    assert answer.status_code == 200, answer.text
    outcomes = answer.json()["items"]
    assert [o["status"] for o in outcomes] == ["error", "created"]
    assert outcomes[0]["problem"]["status"] == 409
    monkeypatch.undo()
    mine = (await anonymous.get("/mobis/v1/me/observations", headers=me)).json()["items"]
    assert {o["id"] for o in mine} == {first["id"], other["id"]}


async def test_photos_uploaded_together_are_marked_stored_together(
    anonymous: httpx.AsyncClient, signed_up: Any, observation: Observation, app: FastAPI
) -> None:
    _, me = await signed_up("gc@example.org")
    photos = [png(40 + i) for i in range(6)]
    items = [item(observation(), [p]) for p in photos]
    await anonymous.post("/mobis/v1/sync", json={"observations": items}, headers=me)
    uploads = await asyncio.gather(
        *(
            anonymous.put(f"/mobis/v1/media/{i['media'][0]['id']}", content=p, headers=me)
            for i, p in zip(items, photos, strict=True)
        )
    )
    assert [u.status_code for u in uploads] == [200] * len(photos)
    # Each answered once its mark was committed: a retried sync finds nothing missing.
    again = await anonymous.post("/mobis/v1/sync", json={"observations": items}, headers=me)
    assert [o["missingMedia"] for o in again.json()["items"]] == [[]] * len(photos)


async def test_a_media_gone_meanwhile_fails_no_other_mark_of_its_batch(
    anonymous: httpx.AsyncClient, signed_up: Any, observation: Observation, app: FastAPI
) -> None:
    _, me = await signed_up("gm@example.org")
    photo = png(60)
    sent = item(observation(), [photo])
    await anonymous.post("/mobis/v1/sync", json={"observations": [sent]}, headers=me)
    marks = StoredMarks(app.state.parts.unit)
    when = datetime.now(UTC)
    # One transaction for both (queued before the writer runs): the first media's
    # observation was deleted during its upload, the second is there.
    await asyncio.gather(
        marks.mark(str(uuid.uuid4()), 1, when), marks.mark(sent["media"][0]["id"], 1, when)
    )
    again = await anonymous.post("/mobis/v1/sync", json={"observations": [sent]}, headers=me)
    assert again.json()["items"][0]["missingMedia"] == []


class _Marks:
    """A repository that records the marks of each transaction; the first waits for
    ``release``."""

    def __init__(self, fail: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.writing = asyncio.Event()
        self.release = asyncio.Event()
        self.fail = fail

    async def mark_media_stored(self, marks: Sequence[tuple[str, int, Any]]) -> None:
        self.batches.append([media_id for media_id, _, _ in marks])
        self.writing.set()
        await self.release.wait()
        if self.fail:
            raise RuntimeError("the disk is full")

    @contextlib.asynccontextmanager
    async def unit(self) -> AsyncIterator[Any]:
        yield self


async def test_stored_marks_coming_during_a_write_share_the_next_transaction() -> None:
    repo = _Marks()
    marks = StoredMarks(repo.unit)
    when = datetime.now(UTC)
    first = asyncio.create_task(marks.mark("a", 1, when))
    await repo.writing.wait()
    rest = [asyncio.create_task(marks.mark(m, 1, when)) for m in "bc"]
    await asyncio.sleep(0)  # one turn of the loop: the new tasks queue their marks
    assert len(marks._groups._pending) == 2
    assert not first.done()  # an upload answers only once its mark is committed
    repo.release.set()
    await asyncio.gather(first, *rest)
    assert repo.batches == [["a"], ["b", "c"]]


async def test_a_failed_write_of_stored_marks_fails_each_upload_of_it() -> None:
    repo = _Marks(fail=True)
    marks = StoredMarks(repo.unit)
    when = datetime.now(UTC)
    first = asyncio.create_task(marks.mark("a", 1, when))
    await repo.writing.wait()
    second = asyncio.create_task(marks.mark("b", 1, when))
    await asyncio.sleep(0)  # one turn of the loop: the new task queues its mark
    assert len(marks._groups._pending) == 1
    repo.release.set()
    results = await asyncio.gather(first, second, return_exceptions=True)
    assert [str(r) for r in results] == ["the disk is full"] * 2
    assert repo.batches == [["a"], ["b"]]


async def test_an_upload_needs_a_live_session_of_the_media_owner(
    app: FastAPI, anonymous: httpx.AsyncClient, signed_up: Any, observation: Observation
) -> None:
    user_id, me = await signed_up("ls@example.org")
    photo = png(9)
    new = item(observation(), [photo])
    await anonymous.post("/mobis/v1/sync", json={"observations": [new]}, headers=me)
    login = await anonymous.post(
        "/mobis/v1/auth/login", json={"email": "ls@example.org", "password": PASSWORD}
    )
    tokens = login.json()
    through_gateway = me | {"Authorization": f"Bearer {tokens['access_token']}"}
    path = f"/mobis/v1/media/{new['media'][0]['id']}"
    live = await anonymous.put(path, content=photo, headers=through_gateway)
    assert live.status_code == 200, live.text
    # The upload's own lookup reads the media as the ORM does (on SQLite, straight from the
    # driver): a stored one answers again as stored, without reaching ingest.
    parts = app.state.parts
    async with parts.reads() as repo:
        found = await repo.user_with_media(user_id, None, new["media"][0]["id"])
        orm = await repo.media_of_user(new["media"][0]["id"], user_id)
    assert found is not None
    assert orm is not None
    user, media = found
    assert user == user_id
    assert media is not None
    assert {c: getattr(media, c) for c in MEDIA} == {c: getattr(orm, c) for c in MEDIA}
    assert isinstance(media.stored_at, datetime)
    out = await anonymous.post(
        "/mobis/v1/auth/logout", json={"refresh_token": tokens["refresh_token"]}, headers=me
    )
    assert out.status_code == 204
    ended = await anonymous.put(path, content=photo, headers=through_gateway)
    assert ended.status_code == 401
    assert ended.json()["type"] == "urn:c4c:problem:unauthenticated"
    _, other = await signed_up("lt@example.org")
    assert (await anonymous.put(path, content=photo, headers=other)).status_code == 404
    stored = await anonymous.put(path, content=photo, headers=me)
    assert stored.status_code == 200
    assert stored.json()["stored"] is True


def _rows(*values: dict[str, Any]) -> list[Row[Any]]:
    """Plain rows with these columns, as the repository reads them."""
    engine = create_engine("sqlite://")
    with engine.connect() as connection:
        return [
            connection.execute(select(*(literal(v).label(k) for k, v in row.items()))).one()
            for row in values
        ]


def _shown_row(seq: int, **changes: Any) -> Row[Any]:
    when = datetime(2024, 5, 3, 8, 15, tzinfo=UTC)
    row = {
        "seq": seq,
        "id": f"00000000-0000-0000-0000-{seq:012d}",
        "project": "natusfera",
        "version": 1,
        "summary": '{"scientificName": "Bellis perennis"}',
        "score": None,
        "grade": None,
        "flags": None,
        "scored_at": None,
        "suggestions": None,
        "created_at": when,
        "updated_at": when,
    } | changes
    return _rows(row)[0]


_MEDIA = {"id": "m", "content_type": "image/png", "size": 9, "received": 0, "stored_at": None}


def test_shown_items_are_rendered_again_only_when_something_shown_changed() -> None:
    shown = ShownItems(size=2)
    media = _rows(_MEDIA)
    first = shown.rendered(_shown_row(1), media)
    assert json.loads(first)["status"] == "awaiting-media"
    assert json.loads(first)["observation"] == {"scientificName": "Bellis perennis"}
    assert shown.rendered(_shown_row(1), _rows(_MEDIA)) is first
    stored = _rows(_MEDIA | {"received": 9, "stored_at": datetime.now(UTC)})
    assert json.loads(shown.rendered(_shown_row(1), stored))["status"] == "uploaded"
    flags = '[{"code": "X", "severity": "warning", "message": "m", "tip": "Come closer."}]'
    scored = json.loads(
        shown.rendered(_shown_row(1, score=0.5, flags=flags, scored_at=datetime.now(UTC)), stored)
    )
    assert (scored["status"], scored["quality"]["tips"]) == ("scored", ["Come closer."])
    # Two kept: the least recently shown went.
    assert shown.rendered(_shown_row(1), media) is not first


def test_a_shown_page_is_what_pydantic_renders_and_is_rendered_again_when_an_item_changed() -> None:
    shown = ShownItems(size=10, pages=1)
    rows = [_shown_row(2), _shown_row(1)]
    media = {rows[0].id: _rows(_MEDIA), rows[1].id: []}
    page = shown.page(rows, media, "bz0x")
    expected = MyObservationPage(
        items=[shown_item(r, media[r.id]) for r in rows], next="bz0x"
    ).model_dump_json()
    assert page.body == expected.encode()
    assert shown.page([_shown_row(2), _shown_row(1)], media, "bz0x") is page
    assert shown.page(rows, media, None).body.endswith(b',"next":null}')
    scored = [_shown_row(2, score=0.5, scored_at=datetime.now(UTC)), rows[1]]
    again = shown.page(scored, media, "bz0x")
    assert again.etag != page.etag
    assert [i["scored"] for i in json.loads(again.body)["items"]] == [True, False]


# --- reservations a sync left ---------------------------------------------------------------


async def _cut_off(
    app: FastAPI,
    anonymous: httpx.AsyncClient,
    me: dict[str, str],
    items: list[dict[str, Any]],
    *,
    ingest_got_them: bool,
) -> None:
    """A sync whose answer from ingest never comes back (after ingest stored the items, or
    before it got them): its reservations stay unconfirmed."""
    ingest = app.state.parts.observations.ingest
    create_batch = ingest.create_batch

    async def lost(observations: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        if ingest_got_them:
            await create_batch(observations)
        raise UpstreamFailed("The observation store is unreachable (ReadTimeout).")

    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(ingest, "create_batch", lost)
        answer = await anonymous.post("/mobis/v1/sync", json={"observations": items}, headers=me)
    assert answer.status_code == 502, answer.text


async def _untouched_for(app: FastAPI, ids: Sequence[str], seconds: float) -> None:
    async with app.state.parts.unit() as repo:
        for observation_id in ids:
            when = datetime.now(UTC) - timedelta(seconds=seconds)
            await repo.update_owned(observation_id, {"updated_at": when})


async def _reservations(app: FastAPI, ids: Sequence[str]) -> dict[str, tuple[bool, list[str]]]:
    """What MOBIS keeps of each observation: confirmed, and the media announced."""
    async with app.state.parts.reads() as repo:
        rows = await repo.owned(ids)
        media = await repo.media_of(list(rows))
    return {i: (r.confirmed, [m.id for m in media[i]]) for i, r in rows.items()}


def _dropped() -> float:
    return REGISTRY.get_sample_value("c4c_mobis_reservations_dropped_total") or 0.0


async def _updated_at(app: FastAPI, observation_id: str) -> datetime:
    async with app.state.parts.reads() as repo:
        row = (await repo.owned([observation_id]))[observation_id]
    return utc(row.updated_at)


async def test_reservations_left_by_a_cut_off_sync_are_forgotten_unless_ingest_has_them(
    app: FastAPI,
    anonymous: httpx.AsyncClient,
    ingest_client: httpx.AsyncClient,
    signed_up: Any,
    observation: Observation,
    settings: Any,
) -> None:
    """Ingest never got one observation: once untouched for the grace period, its
    reservation is forgotten, media included, and the app's retry creates it. Ingest stored
    another but its answer was lost, and a third's id is of someone else's observation in
    ingest (a takeover attempt): neither is confirmed (holding the id does not make it this
    user's), both wait, touched, for the app's retry. One inside the grace stays as it is."""
    _, me = await signed_up("settle@example.org")
    stored, lost, fresh, theirs = (item(observation(), [png(n)]) for n in (11, 12, 13, 17))
    someone_elses = observation(id=theirs["id"], recordedBy="someone else")
    created = await ingest_client.post("/ingest/v1/observations", json=someone_elses)
    assert created.status_code == 201, created.text
    await _cut_off(app, anonymous, me, [stored], ingest_got_them=True)
    await _cut_off(app, anonymous, me, [lost, fresh, theirs], ingest_got_them=False)
    grace = settings.reservation_grace_seconds
    await _untouched_for(app, [stored["id"], lost["id"], theirs["id"]], grace + 5)
    await _untouched_for(app, [fresh["id"]], grace - 30)
    dropped = _dropped()

    settle = app.state.parts.observations.settle_reservations
    assert await settle(batch=3) is True  # a full batch: more may be left
    assert await settle(batch=3) is False  # the two ingest has were touched: not again

    assert _dropped() - dropped == 1
    mine = (await anonymous.get("/mobis/v1/me/observations", headers=me)).json()["items"]
    assert mine == []
    assert await _reservations(app, [stored["id"], lost["id"], fresh["id"], theirs["id"]]) == {
        stored["id"]: (False, [stored["media"][0]["id"]]),
        fresh["id"]: (False, [fresh["media"][0]["id"]]),
        theirs["id"]: (False, [theirs["media"][0]["id"]]),
    }
    cutoff = datetime.now(UTC) - timedelta(seconds=grace)
    assert await _updated_at(app, stored["id"]) > cutoff
    unchanged = await ingest_client.get(f"/ingest/v1/observations/{theirs['id']}")
    assert unchanged.json()["recordedBy"] == "someone else"
    # The apps that retry: the forgotten one is created, the stored one confirmed.
    retry = await anonymous.post(
        "/mobis/v1/sync", json={"observations": [lost, stored]}, headers=me
    )
    assert [o["status"] for o in retry.json()["items"]] == ["created", "created"]
    mine = (await anonymous.get("/mobis/v1/me/observations", headers=me)).json()["items"]
    assert {o["id"] for o in mine} == {lost["id"], stored["id"]}


async def test_the_settler_forgets_no_reservation_a_retry_confirms_or_renews_meanwhile(
    app: FastAPI,
    anonymous: httpx.AsyncClient,
    signed_up: Any,
    observation: Observation,
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two replicas: one settles while the app's retries go to the other. Ingest lacked
    both observations when the settler asked, but by the time it writes, one retry has
    sent and confirmed its observation, and the other reserved its own again (its ingest
    call failing): neither is forgotten, nor loses its media."""
    _, me = await signed_up("race-settle@example.org")
    confirming, renewing = (item(observation(), [png(n)]) for n in (14, 15))
    await _cut_off(app, anonymous, me, [confirming, renewing], ingest_got_them=False)
    await _untouched_for(
        app, [confirming["id"], renewing["id"]], settings.reservation_grace_seconds + 5
    )
    ingest = app.state.parts.observations.ingest
    get = ingest.get

    async def retried_meanwhile(observation_id: str) -> dict[str, Any] | None:
        answer = await get(observation_id)
        if observation_id == confirming["id"]:
            retry = await anonymous.post(
                "/mobis/v1/sync", json={"observations": [confirming]}, headers=me
            )
            assert retry.json()["items"][0]["status"] == "created", retry.text
        else:
            await _cut_off(app, anonymous, me, [renewing], ingest_got_them=False)
        return answer

    monkeypatch.setattr(ingest, "get", retried_meanwhile)
    dropped = _dropped()
    assert await app.state.parts.observations.settle_reservations() is False
    assert _dropped() == dropped
    assert await _reservations(app, [confirming["id"], renewing["id"]]) == {
        confirming["id"]: (True, [confirming["media"][0]["id"]]),
        renewing["id"]: (False, [renewing["media"][0]["id"]]),
    }


async def test_a_reservation_ingest_cannot_be_asked_about_waits_and_the_others_go_on(
    app: FastAPI,
    anonymous: httpx.AsyncClient,
    signed_up: Any,
    observation: Observation,
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, me = await signed_up("unknown@example.org")
    failing, lost = (item(observation(), [png(n)]) for n in (18, 19))
    await _cut_off(app, anonymous, me, [failing, lost], ingest_got_them=False)
    await _untouched_for(app, [failing["id"], lost["id"]], settings.reservation_grace_seconds + 5)
    ingest = app.state.parts.observations.ingest
    get = ingest.get

    async def failing_for_one(observation_id: str) -> dict[str, Any] | None:
        if observation_id == failing["id"]:
            raise UpstreamFailed("The observation store answered 500.")
        return await get(observation_id)

    monkeypatch.setattr(ingest, "get", failing_for_one)
    assert await app.state.parts.observations.settle_reservations() is False
    assert await _reservations(app, [failing["id"], lost["id"]]) == {
        failing["id"]: (False, [failing["media"][0]["id"]]),
    }


async def test_a_retry_reserves_again_what_the_settler_dropped_under_it(
    app: FastAPI,
    anonymous: httpx.AsyncClient,
    signed_up: Any,
    observation: Observation,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The settler's drop commits after the retry found the reservation there, before the
    retry locked it: the retry reserves it anew, with its media, and creates it."""
    _, me = await signed_up("under@example.org")
    new = item(observation(), [png(16)])
    await _cut_off(app, anonymous, me, [new], ingest_got_them=False)
    owned_locked = Repository.owned_locked

    async def dropped_first(self: Repository, ids: Sequence[str]) -> dict[str, Any]:
        await self.drop_reserved(ids)
        return await owned_locked(self, ids)

    with monkeypatch.context() as patched:
        patched.setattr(Repository, "owned_locked", dropped_first)
        retry = await anonymous.post("/mobis/v1/sync", json={"observations": [new]}, headers=me)
    outcome = retry.json()["items"][0]
    assert (outcome["status"], outcome["missingMedia"]) == ("created", [new["media"][0]["id"]])
    assert await _reservations(app, [new["id"]]) == {new["id"]: (True, [new["media"][0]["id"]])}
