"""Media uploads with real plant photos (``../shared/data/plants``): streamed, sniffed,
probed, hashed, idempotent, served with ETag and Range; EXIF removed from the public copy
of an obscured observation; hostile files refused with 4xx."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

API = "/ingest/v1"
Body = Callable[..., dict[str, Any]]


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture
def photo(test_data: Path) -> Path:
    return test_data / "plants" / "Anemone_nemorosa" / "image_1206.jpg"


@pytest.fixture
def photo_bytes(photo: Path) -> bytes:
    return photo.read_bytes()


def with_gps(photo: Path) -> bytes:
    """The real photo re-saved with EXIF capture time and a GPS position."""
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9003] = "2024:05:03 10:15:00"
    exif.get_ifd(0x8769)[0x9011] = "+02:00"
    gps = exif.get_ifd(0x8825)
    gps.update({1: "N", 2: (41.0, 23.0, 6.36), 3: "E", 4: (2.0, 10.0, 24.24)})
    out = io.BytesIO()
    with Image.open(photo) as image:
        image.save(out, "JPEG", exif=exif, quality=92)
    return out.getvalue()


async def new_observation(client: httpx.AsyncClient, body: dict[str, Any]) -> str:
    response = await client.post(f"{API}/observations", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def test_raw_upload_is_sniffed_hashed_and_served_with_etag_and_range(
    client: httpx.AsyncClient, observation: Body, photo: Path, photo_bytes: bytes
) -> None:
    obs_id = await new_observation(client, observation())
    data = photo_bytes
    # The header lies about nothing but says nothing either: the bytes decide.
    response = await client.post(
        f"{API}/observations/{obs_id}/media",
        content=data,
        headers={"content-type": "application/octet-stream"},
    )
    assert response.status_code == 201, response.text
    media = response.json()
    assert media["format"] == "image/jpeg"
    assert media["type"] == "image"
    assert media["sha256"] == hashlib.sha256(data).hexdigest()
    assert media["size"] == len(data)
    with Image.open(photo) as image:
        assert (media["width"], media["height"]) == image.size
    assert media["url"] == f"http://suite.test{API}/media/{media['id']}"

    served = await client.get(f"{API}/media/{media['id']}")
    assert served.status_code == 200
    assert served.content == data
    assert served.headers["content-type"] == "image/jpeg"
    etag = served.headers["etag"]
    assert etag == f'"{media["sha256"]}"'
    assert (
        await client.get(f"{API}/media/{media['id']}", headers={"If-None-Match": etag})
    ).status_code == 304
    part = await client.get(f"{API}/media/{media['id']}", headers={"Range": "bytes=100-199"})
    assert part.status_code == 206
    assert part.content == data[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(data)}"
    beyond = await client.get(
        f"{API}/media/{media['id']}", headers={"Range": f"bytes={len(data) + 5}-"}
    )
    assert beyond.status_code == 416
    assert beyond.headers["content-type"] == "application/problem+json"
    assert beyond.headers["content-range"] == f"bytes */{len(data)}"
    backwards = await client.get(f"{API}/media/{media['id']}", headers={"Range": "bytes=5-1"})
    assert backwards.status_code == 400
    assert backwards.headers["content-type"] == "application/problem+json"

    listed = (await client.get(f"{API}/observations/{obs_id}")).json()
    assert [m["id"] for m in listed["media"]] == [media["id"]]
    assert (await client.get(f"{API}/observations?hasMedia=true")).json()["items"][0][
        "id"
    ] == obs_id


async def test_multipart_upload_of_several_real_photos(
    client: httpx.AsyncClient, observation: Body, test_data: Path
) -> None:
    obs_id = await new_observation(client, observation())
    photos = sorted((test_data / "plants" / "Tulipa_sylvestris").glob("*.jpg"))[:3]
    for path in photos:
        response = await client.post(
            f"{API}/observations/{obs_id}/media",
            files={"file": (path.name, path.read_bytes(), "image/jpeg")},
        )
        assert response.status_code == 201, response.text
        assert response.json()["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    stored = (await client.get(f"{API}/observations/{obs_id}")).json()["media"]
    assert [m["sha256"] for m in stored] == [
        hashlib.sha256(p.read_bytes()).hexdigest() for p in photos
    ]


async def test_same_media_id_twice_is_idempotent_and_other_content_conflicts(
    client: httpx.AsyncClient, observation: Body, test_data: Path
) -> None:
    obs_id = await new_observation(client, observation())
    first, second = sorted((test_data / "plants" / "Viola_sp").glob("*.jpg"))[:2]
    media_id = str(uuid.uuid4())
    url = f"{API}/observations/{obs_id}/media?mediaId={media_id}"
    created = await client.post(url, content=first.read_bytes())
    again = await client.post(url, content=first.read_bytes())
    assert (created.status_code, again.status_code) == (201, 200)
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == created.json()
    assert problem(await client.post(url, content=second.read_bytes()), 409)["media_id"] == media_id
    assert len((await client.get(f"{API}/observations/{obs_id}")).json()["media"]) == 1
    for malformed in ("-" * 36, media_id.replace("-", "")[:32] + "----"):
        refused = await client.post(
            f"{API}/observations/{obs_id}/media?mediaId={malformed}", content=first.read_bytes()
        )
        assert problem(refused, 422)["errors"][0]["field"] == "mediaId"


async def test_exif_is_read_and_stripped_from_the_public_copy_when_obscured(
    client: httpx.AsyncClient, observation: Body, photo: Path
) -> None:
    data = with_gps(photo)
    plain = await new_observation(client, observation())
    hidden = await new_observation(client, observation(locationObscured=True))

    open_media = (await client.post(f"{API}/observations/{plain}/media", content=data)).json()
    assert open_media["created"] == "2024-05-03T10:15:00+02:00"
    assert open_media["exifLatitude"] == pytest.approx(41.3851, abs=1e-4)
    assert open_media["exifLongitude"] == pytest.approx(2.1734, abs=1e-4)
    served = await client.get(open_media["url"].removeprefix("http://suite.test"))
    assert served.content == data

    obscured = (await client.post(f"{API}/observations/{hidden}/media", content=data)).json()
    assert obscured["sha256"] == hashlib.sha256(data).hexdigest()  # the original is kept
    assert obscured["exifLatitude"] is None
    public = await client.get(obscured["url"].removeprefix("http://suite.test"))
    assert public.status_code == 200
    assert public.content != data
    with Image.open(io.BytesIO(public.content)) as image:
        assert image.format == "JPEG"
        assert not image.getexif().get_ifd(0x8825)
        assert len(image.getexif()) == 0
    assert b"Exif" not in public.content[:2048]

    view = (await client.get(f"{API}/observations/{hidden}")).json()
    assert view["decimalLatitude"] == 41.4
    assert view["decimalLongitude"] == 2.2
    assert view["coordinateUncertaintyInMeters"] >= 7900
    assert view["dataGeneralizations"]


async def test_obscuring_later_strips_exif_from_media_already_there(
    client: httpx.AsyncClient, observation: Body, photo: Path
) -> None:
    created = await client.post(f"{API}/observations", json=observation())
    obs_id = created.json()["id"]
    media = (
        await client.post(f"{API}/observations/{obs_id}/media", content=with_gps(photo))
    ).json()
    tag = (await client.get(f"{API}/observations/{obs_id}")).headers["etag"]
    patched = await client.patch(
        f"{API}/observations/{obs_id}", json={"locationObscured": True}, headers={"If-Match": tag}
    )
    assert patched.status_code == 200, patched.text
    public = await client.get(f"{API}/media/{media['id']}")
    with Image.open(io.BytesIO(public.content)) as image:
        assert not image.getexif().get_ifd(0x8825)


async def test_video_is_withheld_when_the_location_is_obscured(
    client: httpx.AsyncClient, observation: Body, test_data: Path
) -> None:
    clip = (test_data / "video" / "cockatoo.mp4").read_bytes()
    hidden = await new_observation(client, observation(locationObscured=True))
    media = await client.post(f"{API}/observations/{hidden}/media", content=clip)
    assert media.status_code == 201, media.text
    assert media.json()["format"] == "video/mp4"
    assert media.json()["url"] is None
    problem(await client.get(f"{API}/media/{media.json()['id']}"), 404)


async def test_hostile_files_get_4xx_and_leave_nothing(
    client: httpx.AsyncClient, observation: Body, photo_bytes: bytes, app: Any
) -> None:
    obs_id = await new_observation(client, observation())
    url = f"{API}/observations/{obs_id}/media"
    data = photo_bytes

    truncated = problem(await client.post(url, content=data[: len(data) // 2]), 422)
    assert truncated["type"] == "urn:c4c:problem:corrupt-media"
    signature_only = b"\x89PNG\r\n\x1a\n" + bytes(200)
    unreadable = problem(await client.post(url, content=signature_only), 422)
    assert ".staging" not in unreadable["detail"]
    assert "staging" not in str(unreadable)
    text = problem(await client.post(url, content=b"just some text, not a photo"), 415)
    assert text["type"] == "urn:c4c:problem:unsupported-media-type"
    mismatch = problem(
        await client.post(url, content=data, headers={"content-type": "image/png"}), 415
    )
    assert mismatch["detected"] == "image/jpeg"
    bomb = io.BytesIO()
    Image.new("L", (12_000, 12_000)).save(bomb, "PNG")  # 144 Mpx, a few hundred KB
    assert (
        problem(await client.post(url, content=bomb.getvalue()), 413)["type"]
        == "urn:c4c:problem:image-too-large"
    )
    app.state.parts.settings.media_max_bytes = 10_000
    assert (
        problem(await client.post(url, content=data), 413)["type"]
        == "urn:c4c:problem:media-too-large"
    )
    problem(
        await client.post(f"{API}/observations/{uuid.uuid4()}/media", content=b"\xff\xd8\xff"), 404
    )

    assert (await client.get(f"{API}/observations/{obs_id}")).json()["media"] == []
    media_dir = app.state.parts.storage.root
    assert not [p for p in media_dir.rglob("*") if p.is_file()]


async def test_an_upload_in_progress_holds_no_transaction(
    client: httpx.AsyncClient, observation: Any, photo_bytes: bytes
) -> None:
    """While a client is still sending a file, other writes go on (on SQLite a transaction
    held across the upload would hold the one connection until the last byte)."""
    observation_id = await new_observation(client, observation())
    started, finish = asyncio.Event(), asyncio.Event()

    async def slowly() -> Any:
        yield photo_bytes[:1000]
        started.set()
        await finish.wait()
        yield photo_bytes[1000:]

    upload = asyncio.create_task(
        client.post(
            f"{API}/observations/{observation_id}/media",
            content=slowly(),
            headers={"Content-Type": "image/jpeg"},
        )
    )
    await asyncio.wait_for(started.wait(), 10)
    created = await asyncio.wait_for(client.post(f"{API}/observations", json=observation()), 10)
    assert created.status_code == 201, created.text
    assert not upload.done()
    finish.set()
    uploaded = await upload
    assert uploaded.status_code == 201, uploaded.text
    assert uploaded.json()["sha256"] == hashlib.sha256(photo_bytes).hexdigest()


async def _held_uploads(
    client: httpx.AsyncClient,
    ids: list[str],
    photo_bytes: bytes,
    monkeypatch: pytest.MonkeyPatch,
    uploads: Any,
    units: str,
    group: Any,
    while_held: Callable[[], Awaitable[None]] | None = None,
) -> tuple[list[httpx.Response], int]:
    """Upload a photo to each of ``ids`` while the first unit of work of ``uploads.<units>``
    is held until all of them queued in ``group`` (then ``while_held`` runs); the answers,
    and how many units of work there were."""
    unit, gate, opened = getattr(uploads, units), asyncio.Event(), [0]

    @contextlib.asynccontextmanager
    async def gated() -> AsyncIterator[Any]:
        opened[0] += 1
        await gate.wait()
        async with unit() as service:
            yield service

    submit, arrived, all_queued = group.submit, [0], asyncio.Event()

    async def counted(item: Any) -> Any:
        arrived[0] += 1
        if arrived[0] == len(ids):
            all_queued.set()  # seen once this task yields, after the item is queued
        return await submit(item)

    monkeypatch.setattr(uploads, units, gated)
    monkeypatch.setattr(group, "submit", counted)
    posts = [
        asyncio.create_task(
            client.post(f"{API}/observations/{i}/media", content=photo_bytes + bytes([n]))
        )
        for n, i in enumerate(ids)
    ]
    await asyncio.wait_for(all_queued.wait(), 10)  # the first one's unit at the gate
    if while_held is not None:
        await while_held()
    gate.set()
    return list(await asyncio.gather(*posts)), opened[0]


async def test_rows_of_uploads_finishing_together_share_a_transaction(
    app: Any,
    client: httpx.AsyncClient,
    observation: Any,
    photo_bytes: bytes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While one media row commits, the next uploads' rows queue and go in one transaction;
    one refused there (its observation deleted meanwhile) fails alone."""
    uploads = app.state.uploads
    ids = [await new_observation(client, observation()) for _ in range(4)]

    async def delete_the_last() -> None:
        assert (await client.delete(f"{API}/observations/{ids[3]}")).status_code == 204

    answers, transactions = await _held_uploads(
        client, ids, photo_bytes, monkeypatch, uploads, "units", uploads._rows, delete_the_last
    )
    assert transactions in (1, 2)  # all together, or the first then the rest behind it
    statuses = [a.status_code for a in answers]
    assert statuses == [201, 201, 201, 410], [a.text for a in answers]
    for observation_id, answer in zip(ids[:3], answers[:3], strict=True):
        media = (await client.get(f"{API}/observations/{observation_id}")).json()["media"]
        assert [m["id"] for m in media] == [answer.json()["id"]]


async def test_checks_of_uploads_starting_together_share_a_read(
    app: Any,
    client: httpx.AsyncClient,
    observation: Any,
    photo_bytes: bytes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While one upload's observation is read, the next uploads' wait and are read together;
    one for an observation that does not exist fails alone, before its file is stored."""
    uploads = app.state.uploads
    ids = [await new_observation(client, observation()) for _ in range(3)] + [str(uuid.uuid4())]
    answers, reads = await _held_uploads(
        client, ids, photo_bytes, monkeypatch, uploads, "readings", uploads._targets
    )
    assert reads in (1, 2)  # all together, or the first then the rest queued behind it
    assert [a.status_code for a in answers] == [201, 201, 201, 404], [a.text for a in answers]
    stored = [p for p in app.state.parts.storage.root.rglob("*") if p.is_file()]
    assert len(stored) == 3
