"""MOBIS end to end, through the gateway, as a phone app uses it — once in embedded mode (one
process, SQLite, the in-process bus) and once distributed (each service its own process,
RabbitMQ and PostgreSQL):

register → log in → app configuration → sync 3 observations with photos (one a real plant
photo) → the same sync again (no duplicates) → upload only the missing media, resuming
after a dropped connection → scored and identified, in "my observations" and on the SSE
stream → refresh rotation and reuse detection. Abuse: brute force slowed, another user's
ids refused on every route, a deleted account's token refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from PIL import Image

from c4c.shared.testing import LocalRun, Processes, free_ports

pytestmark = pytest.mark.slow

PASSWORD = "a long enough password"
PROJECT = "natusfera"
ENROL = {"Leucanthemum_vulgare": "Leucanthemum vulgare", "Primula_veris": "Primula veris"}
ENROLLED = 7  # photos per species in the gallery; the plant photo synced is not among them
SERVICES = {"ingest": ("/ingest",), "quality": ("/quality",), "plantid": ("/plantid", "/v2")}
SERVICES |= {"mobis": ("/mobis",)}
FAST_HASHING = {
    "C4C_MOBIS_PASSWORD_HASH_MEMORY_KIB": "8192",
    "C4C_MOBIS_PASSWORD_HASH_TIME_COST": "1",
}
Eventually = Callable[..., Any]


def synthetic_photo(seed: int) -> bytes:
    image = Image.new("RGB", (320, 240), (40 + seed * 50, 120, 200 - seed * 40))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def sync_item(photo: bytes, **fields: Any) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "createdAt": "2024-05-03T08:15:00Z",
        "formVersion": "plant-v1",
        "observation": {
            "datasetID": PROJECT,
            "eventDate": "2024-05-03T10:15:00+02:00",
            "decimalLatitude": 41.3851,
            "decimalLongitude": 2.1734,
            "coordinateUncertaintyInMeters": 8.0,
            "countryCode": "ES",
            "license": "CC-BY",
            **fields,
        },
        "media": [
            {
                "id": str(uuid.uuid4()),
                "sha256": hashlib.sha256(photo).hexdigest(),
                "size": len(photo),
                "contentType": "image/jpeg",
            }
        ],
    }


async def enrol_gallery(plantid: httpx.AsyncClient, plants: Path) -> None:
    """The project's flora in plant identification (so the plant photo can be named)."""
    created = await plantid.post("/plantid/v1/projects", json={"id": PROJECT, "title": "Natusfera"})
    assert created.status_code in (201, 409), created.text
    for folder, name in ENROL.items():
        photos = sorted((plants / folder).glob("*.jpg"))[:ENROLLED]
        answer = await plantid.post(
            f"/plantid/v1/projects/{PROJECT}/references",
            data={"species": name, "organ": "flower", "author": "e2e"},
            files=[("images", (p.name, p.read_bytes(), "image/jpeg")) for p in photos],
        )
        assert answer.status_code == 201, answer.text


async def sign_up(client: httpx.AsyncClient, email: str) -> dict[str, Any]:
    registered = await client.post(
        "/mobis/v1/auth/register",
        json={"email": email, "password": PASSWORD, "displayName": email.split("@")[0]},
    )
    assert registered.status_code == 201, registered.text
    login = await client.post(
        "/mobis/v1/auth/login", json={"email": email, "password": PASSWORD, "deviceId": "phone-1"}
    )
    assert login.status_code == 200, login.text
    tokens: dict[str, Any] = login.json()
    return tokens


def bearer(tokens: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens['access_token']}"}


async def upload(
    client: httpx.AsyncClient, auth: dict[str, str], media_id: str, photo: bytes, start: int = 0
) -> httpx.Response:
    return await client.put(
        f"/mobis/v1/media/{media_id}",
        content=photo[start:],
        headers=auth | {"Content-Range": f"bytes {start}-{len(photo) - 1}/{len(photo)}"},
    )


async def read_stream(
    client: httpx.AsyncClient, auth: dict[str, str], observation_id: str, seen: set[str]
) -> None:
    """Follow the SSE stream until it told of this observation's score and identification,
    reconnecting with Last-Event-ID when the server ends it, as an app does."""
    last = None
    while not {"scored", "identified"} <= seen:
        headers = auth | ({"Last-Event-ID": last} if last else {})
        async with client.stream("GET", "/mobis/v1/me/events", headers=headers) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            kind = None
            async for line in stream.aiter_lines():
                if line.startswith("id: "):
                    last = line.removeprefix("id: ")
                elif line.startswith("event: "):
                    kind = line.removeprefix("event: ")
                elif line.startswith("data: ") and kind is not None:
                    if json.loads(line.removeprefix("data: "))["observationId"] == observation_id:
                        seen.add(kind)
                    if {"scored", "identified"} <= seen:
                        return


async def scenario(
    client: httpx.AsyncClient, plantid: httpx.AsyncClient, plants: Path, eventually: Eventually
) -> None:
    await enrol_gallery(plantid, plants)
    email = f"volunteer-{uuid.uuid4().hex[:6]}@example.org"
    tokens = await sign_up(client, email)
    auth = bearer(tokens)

    config = await client.get(f"/mobis/v1/apps/{PROJECT}/config", headers=auth)
    assert config.status_code == 200, config.text
    assert PROJECT in [p["id"] for p in config.json()["projects"]]
    again = await client.get(
        f"/mobis/v1/apps/{PROJECT}/config", headers=auth | {"If-None-Match": config.headers["etag"]}
    )
    assert again.status_code == 304

    # Offline, the app queued three observations; one photo is a real plant.
    plant_photo = sorted((plants / "Leucanthemum_vulgare").glob("*.jpg"))[ENROLLED + 1].read_bytes()
    photos = [plant_photo, synthetic_photo(1), synthetic_photo(2)]
    readings = [
        {"measurementType": "air temperature", "measurementValue": 21.5, "measurementUnit": "Cel"}
    ]
    items = [
        sync_item(photos[0], scientificName="Leucanthemum vulgare"),
        sync_item(photos[1], measurements=readings),
        sync_item(photos[2]),
    ]
    first = await client.post("/mobis/v1/sync", json={"observations": items}, headers=auth)
    assert first.status_code == 200, first.text
    assert [o["status"] for o in first.json()["items"]] == ["created"] * 3
    # The answer was lost on the way back: the app sends the same batch again.
    retry = await client.post("/mobis/v1/sync", json={"observations": items}, headers=auth)
    assert [o["status"] for o in retry.json()["items"]] == ["duplicate"] * 3
    mine = (await client.get("/mobis/v1/me/observations", headers=auth)).json()["items"]
    assert sorted(o["id"] for o in mine) == sorted(i["id"] for i in items)

    # Two photos go up at once; the plant photo's upload drops half-way.
    for item, photo in zip(items[1:], photos[1:], strict=True):
        done = await upload(client, auth, item["media"][0]["id"], photo)
        assert done.status_code == 200, done.text
    plant_media = items[0]["media"][0]["id"]
    half = len(plant_photo) // 2
    cut = await client.put(
        f"/mobis/v1/media/{plant_media}",
        content=plant_photo[:half],
        headers=auth | {"Content-Range": f"bytes 0-{half - 1}/{len(plant_photo)}"},
    )
    assert cut.status_code == 202, cut.text
    for item in items:
        missing = await client.get(
            f"/mobis/v1/me/observations/{item['id']}/missing-media", headers=auth
        )
        expected = [plant_media] if item is items[0] else []
        assert [m["id"] for m in missing.json()["missing"]] == expected
    offset = int(
        (await client.get(f"/mobis/v1/media/{plant_media}", headers=auth)).headers["upload-offset"]
    )
    assert offset == half
    resumed = await upload(client, auth, plant_media, plant_photo, start=offset)
    assert resumed.status_code == 200, resumed.text

    # Quality scores every observation; plant identification names the plant.
    seen: set[str] = set()
    stream = asyncio.create_task(read_stream(client, auth, items[0]["id"], seen))

    last_seen: list[dict[str, Any]] = []

    async def scored_and_identified() -> bool:
        page = (await client.get("/mobis/v1/me/observations", headers=auth)).json()["items"]
        last_seen[:] = page
        by_id = {o["id"]: o for o in page}
        plant = by_id[items[0]["id"]]
        return all(by_id[i["id"]]["scored"] for i in items) and plant["identified"]

    try:
        try:
            await eventually(scored_and_identified, timeout=60, interval=0.25)
        except pytest.fail.Exception:
            states = [(o["status"], o["scored"], o["identified"]) for o in last_seen]
            pytest.fail(f"not scored and identified within 60 s: {states}")
        await asyncio.wait_for(stream, timeout=30)
    finally:
        stream.cancel()
    assert seen == {"scored", "identified"}
    plant = await client.get(f"/mobis/v1/me/observations/{items[0]['id']}", headers=auth)
    assert plant.json()["suggestions"][0]["scientificName"] == "Leucanthemum vulgare"
    assert plant.json()["quality"]["grade"] in ("casual", "needs_id", "research")

    # Refresh rotation; a repeat of the latest rotated token (its answer lost) gets a new
    # pair, a replay of an older one ends the family.
    rotated = await client.post(
        "/mobis/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}
    )
    assert rotated.status_code == 200, rotated.text
    repeated = await client.post(
        "/mobis/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}
    )
    assert repeated.status_code == 200, repeated.text
    latest = await client.post(
        "/mobis/v1/auth/refresh", json={"refresh_token": repeated.json()["refresh_token"]}
    )
    assert latest.status_code == 200, latest.text
    stolen = await client.post(
        "/mobis/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}
    )
    assert stolen.status_code == 401
    assert stolen.json()["type"] == "urn:c4c:problem:refresh-token-reused"
    after = await client.post(
        "/mobis/v1/auth/refresh", json={"refresh_token": latest.json()["refresh_token"]}
    )
    assert after.status_code == 401
    # The session's access tokens, unexpired, end with it: the volunteer logs in again.
    assert (await client.get("/mobis/v1/me", headers=auth)).status_code == 401
    relogin = await client.post("/mobis/v1/auth/login", json={"email": email, "password": PASSWORD})
    assert relogin.status_code == 200, relogin.text
    auth = bearer(relogin.json())

    await abuse(client, auth, items, photos)


async def abuse(
    client: httpx.AsyncClient,
    victim: dict[str, str],
    items: list[dict[str, Any]],
    photos: list[bytes],
) -> None:
    email = f"mallory-{uuid.uuid4().hex[:6]}@example.org"
    mallory = bearer(await sign_up(client, email))
    oid, mid = items[0]["id"], items[0]["media"][0]["id"]
    routes = [
        ("GET", f"/mobis/v1/me/observations/{oid}", {}),
        ("GET", f"/mobis/v1/me/observations/{oid}/missing-media", {}),
        ("GET", f"/mobis/v1/media/{mid}", {}),
        ("PUT", f"/mobis/v1/media/{mid}", {"content": photos[0]}),
    ]
    for method, path, extra in routes:
        answer = await client.request(method, path, headers=mallory, **extra)
        assert answer.status_code == 404, (method, path, answer.text)
    edit = items[0] | {
        "baseVersion": 1,
        "observation": items[0]["observation"] | {"individualCount": 99},
    }
    for attempt in (items[0], edit):
        answer = await client.post(
            "/mobis/v1/sync", json={"observations": [attempt]}, headers=mallory
        )
        assert answer.json()["items"][0]["status"] == "error", answer.text
    assert (await client.get("/mobis/v1/me/observations", headers=mallory)).json()["items"] == []
    assert (await client.get("/ingest/v1/observations", headers=mallory)).status_code == 403

    # Brute force on mallory's own account: slowed after a few failures.
    codes = []
    for _ in range(8):
        wrong = await client.post(
            "/mobis/v1/auth/login", json={"email": email, "password": "guess it"}
        )
        codes.append(wrong.status_code)
    assert codes[0] == 401, codes
    assert codes[-1] == 429, codes

    # Mallory leaves: the still-unexpired token is refused.
    gone = await client.request(
        "DELETE", "/mobis/v1/me", json={"password": PASSWORD}, headers=mallory
    )
    assert gone.status_code == 204
    assert (await client.get("/mobis/v1/me/observations", headers=mallory)).status_code == 401
    assert (await client.get("/mobis/v1/me/observations", headers=victim)).status_code == 200


# --- embedded -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def embedded_gateway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wait_for: Eventually
) -> AsyncIterator[str]:
    from c4c.gateway.app import create_app  # the suite in one process, as `make run`

    for name in [n for n in os.environ if n.startswith("C4C_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no .env from the checkout
    port = free_ports(1)[0]
    env = {
        "C4C_DATA_DIR": str(tmp_path / "data"),
        "C4C_GATEWAY_PORT": str(port),
        "C4C_GATEWAY_RATE_LIMIT_PER_SECOND": "0",
        "C4C_OUTBOX_POLL_INTERVAL": "0.1",
        "C4C_LOG_LEVEL": "WARNING",
        # The embedded gateway reaches MOBIS through httpx's ASGI transport, which hands a
        # response over only once it is complete: a stream shows its events when it ends.
        "C4C_MOBIS_SSE_MAX_SECONDS": "10",
    } | FAST_HASHING
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    app = create_app()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        await wait_for(lambda: server.started or task.done(), timeout=60)
        assert server.started, "the gateway did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_mobis_end_to_end_embedded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, test_data: Path, eventually: Eventually
) -> None:
    async with embedded_gateway(tmp_path, monkeypatch, eventually) as url:
        key = (tmp_path / "data" / "dev-api-key").read_text().strip()
        async with (
            httpx.AsyncClient(base_url=url, timeout=60) as client,
            httpx.AsyncClient(base_url=url, timeout=120, headers={"X-API-Key": key}) as plantid,
        ):
            await scenario(client, plantid, test_data / "plants", eventually)


# --- distributed ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def distributed_suite(
    tmp_path: Path, broker_url: str, postgres_url: str, wait_for: Eventually
) -> AsyncIterator[dict[str, str]]:
    """The gateway and the services MOBIS needs, each its own process; their URLs."""

    run = LocalRun(SERVICES, broker_url, postgres_url, tmp_path / "data")
    urls = {name: run.url(name) for name in run.components}
    env = run.environment(
        C4C_OUTBOX_POLL_INTERVAL="0.1",
        C4C_GATEWAY_RATE_LIMIT_PER_SECOND="0",  # no JWKS URL: the /mobis upstream's is used
        **FAST_HASHING,
    )
    processes = Processes(run.components, env, tmp_path)
    try:

        async def ready() -> bool:
            processes.check_alive()
            try:
                async with httpx.AsyncClient(timeout=2) as probe:
                    health = (await probe.get(f"{urls['gateway']}/health")).json()
            except (httpx.TransportError, ValueError):
                return False
            return all(health["upstreams"][p[0]]["ready"] for p in SERVICES.values())

        await wait_for(ready, timeout=120, interval=0.3)
        yield urls
    finally:
        processes.stop()
        await run.forget()


@pytest.mark.rabbitmq
@pytest.mark.postgres
async def test_mobis_end_to_end_distributed(
    tmp_path: Path, broker_url: str, postgres_url: str, test_data: Path, eventually: Eventually
) -> None:
    async with (
        distributed_suite(tmp_path, broker_url, postgres_url, eventually) as urls,
        httpx.AsyncClient(base_url=urls["gateway"], timeout=60) as client,
        # The flora is set up by its operator, on the service itself.
        httpx.AsyncClient(base_url=urls["plantid"], timeout=120) as plantid,
    ):
        await scenario(client, plantid, test_data / "plants", eventually)
