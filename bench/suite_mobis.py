"""MOBIS: sync throughput (observations/s, batches of 50 with one photo each: the sync call
and each photo's upload, which MOBIS streams on to ingest) and the p95 time from a sync to
"scored" visible in the user's "my observations", offered at 50 observations/s — embedded
(ingest, quality and MOBIS in one process on SQLite and the in-process bus, through ASGI
transports) and distributed (each its own process, RabbitMQ and PostgreSQL, over loopback
HTTP).

The latency of an observation runs from the start of its batch's sync call (the issue's "time
from sync") to its score being visible in "my observations" as an app sees it: the list,
refreshed every ``POLL_INTERVAL`` (0.2 s) with If-None-Match per page. It counts from when the
sync has answered; the batch's photos are uploaded meanwhile, at the offered rate, and must all
be stored (a failed upload counts its batch as never visible). Until 2026-11-24 a batch was
registered only once all its 50 uploads had finished, which added them to every observation,
and the watcher re-read the whole list every 20 ms, itself a load in the services' process.

In distributed mode the bench's clients (the apps) use aiohttp's connections under httpx's
API: the apps are not on the services' cores, and httpx's own pool cost ~1.3 ms of CPU a
request there (until 2026-11-24, about a tenth of the two cores at 50 observations/s).

Measured once every service answers ``/readyz`` (quality: once its taxonomy and geography are
loaded, which takes seconds), so the figures are of a running suite, not of its start.

Baselines, measured in the same run and the same mode: the same observations and photos
written straight into ingest (its batch endpoint, then each photo), and the p95 from the
start of that batch write to the score visible in ingest's list, measured the same way. The
targets are absolute (the issue's): ≥ 50 observations/s and p95 ≤ 1 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import os
import random
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
from PIL import Image, ImageDraw

from bench._core import Context, Result, ServiceUnavailable
from c4c.shared.aiohttp_transport import AiohttpTransport
from c4c.shared.clients import KEEPALIVE_SECONDS, MAX_CONNECTIONS
from c4c.shared.testing import LocalRun, Processes

SUITE = "mobis"
BATCH = 50
RATE = 50.0  # observations/s offered while latency is measured
THROUGHPUT_BATCHES, THROUGHPUT_QUICK = 10, 2
LATENCY_SECONDS, LATENCY_QUICK = 10, 2
VISIBLE_TIMEOUT = 30.0
UPLOADS_IN_FLIGHT = 8
PAGE = 500  # items per page of the lists the watcher refreshes
POLL_INTERVAL = 0.2  # how often the watcher refreshes the list, like an app showing it live
TARGET_RATE, TARGET_P95 = 50.0, 1.0
SERVICES = ("ingest", "quality", "mobis")
POSTGRES_URL = os.environ.get(
    "C4C_BENCH_POSTGRES_URL",
    os.environ.get("C4C_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"),
)
SECRET = "bench-principal-secret"

log = logging.getLogger("bench.mobis")


def photos(count: int) -> Iterator[bytes]:
    """``count`` different photos, made before anything is timed: a few shapes at random
    places, sizes and colours, so that, like real ones, they share neither bytes nor a
    perceptual hash. (Until 2026-11-24 every batch sent the same 50 plain colours: all had
    one perceptual hash, so quality's duplicate search found every photo a copy of every
    earlier one, and fetched 200 candidates a photo.)"""
    rng = random.Random(20261124)

    def colour() -> tuple[int, int, int]:
        return rng.randrange(256), rng.randrange(256), rng.randrange(256)

    made = []
    for _ in range(count):
        image = Image.new("RGB", (320, 240), colour())
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y = rng.randrange(-40, 320), rng.randrange(-40, 240)
            draw.ellipse((x, y, x + rng.randrange(30, 160), y + rng.randrange(30, 120)), colour())
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=80)
        made.append(buffer.getvalue())
    return iter(made)


def observation(project: str) -> dict[str, Any]:
    return {
        "datasetID": project,
        "eventDate": "2024-05-03T10:15:00+02:00",
        "decimalLatitude": 41.3851,
        "decimalLongitude": 2.1734,
        "coordinateUncertaintyInMeters": 10.0,
        "countryCode": "ES",
        "scientificName": "Bellis perennis",
        "license": "CC-BY",
    }


def sync_batch(project: str, unused: Iterator[bytes]) -> tuple[list[dict[str, Any]], list[bytes]]:
    batch = [next(unused) for _ in range(BATCH)]
    items = [
        {
            "id": str(uuid.uuid4()),
            "createdAt": "2024-05-03T08:15:00Z",
            "observation": observation(project),
            "media": [
                {
                    "id": str(uuid.uuid4()),
                    "sha256": hashlib.sha256(p).hexdigest(),
                    "size": len(p),
                    "contentType": "image/jpeg",
                }
            ],
        }
        for p in batch
    ]
    return items, batch


# --- the two ways in: through MOBIS, and straight into ingest -------------------------------

Synced = Callable[[list[str]], None]
"""Told the observation ids of a batch as soon as the sync (or the batch write) answered."""
Send = Callable[[Synced], Awaitable[list[str]]]
"""Sends one batch of observations, tells ``synced``, then uploads their photos; the ids once
every photo is stored (a failed sync or upload raises)."""


async def _bounded(calls: list[Awaitable[httpx.Response]], ok: tuple[int, ...]) -> None:
    gate = asyncio.Semaphore(UPLOADS_IN_FLIGHT)

    async def one(call: Awaitable[httpx.Response]) -> None:
        async with gate:
            response = await call
        if response.status_code not in ok:
            raise RuntimeError(response.text[:500])

    await asyncio.gather(*(one(c) for c in calls))


def via_mobis(client: httpx.AsyncClient, project: str, unused: Iterator[bytes]) -> Send:
    async def send(synced: Synced) -> list[str]:
        items, photos = sync_batch(project, unused)
        answer = await client.post("/mobis/v1/sync", json={"observations": items})
        statuses = [o["status"] for o in answer.json()["items"]]
        if answer.status_code != 200 or set(statuses) != {"created"}:
            raise RuntimeError(answer.text[:500])
        ids = [item["id"] for item in items]
        synced(ids)
        await _bounded(
            [
                client.put(f"/mobis/v1/media/{item['media'][0]['id']}", content=data)
                for item, data in zip(items, photos, strict=True)
            ],
            (200,),
        )
        return ids

    return send


def via_ingest(client: httpx.AsyncClient, project: str, unused: Iterator[bytes]) -> Send:
    async def send(synced: Synced) -> list[str]:
        items, photos = sync_batch(project, unused)
        bodies = [item["observation"] | {"id": item["id"], "recordedBy": "bench"} for item in items]
        answer = await client.post("/ingest/v1/observations:batch", json=bodies)
        if answer.status_code != 200 or answer.json()["created"] != BATCH:
            raise RuntimeError(answer.text[:500])
        ids = [item["id"] for item in items]
        synced(ids)
        await _bounded(
            [
                client.post(
                    f"/ingest/v1/observations/{item['id']}/media",
                    content=data,
                    headers={"Content-Type": "image/jpeg"},
                )
                for item, data in zip(items, photos, strict=True)
            ],
            (201,),
        )
        return ids

    return send


Scored = Callable[[], Awaitable[set[str]]]
"""The ids whose score is visible now."""


def scored_in_mobis(client: httpx.AsyncClient) -> Scored:
    return _pages(client, "/mobis/v1/me/observations", {}, lambda o: bool(o["scored"]))


def scored_in_ingest(client: httpx.AsyncClient, project: str) -> Scored:
    return _pages(
        client,
        "/ingest/v1/observations",
        {"project": project},
        lambda o: o["quality"]["score"] is not None,
    )


def _pages(
    client: httpx.AsyncClient,
    path: str,
    params: dict[str, Any],
    is_scored: Callable[[dict[str, Any]], bool],
) -> Scored:
    """Every page of a list, as an app refreshes it: conditionally (If-None-Match with the
    ETag it got for that page, where the service gives one), so an unchanged page costs the
    app no parsing; the ids whose score is visible."""
    cache: dict[str | None, tuple[str, set[str], str | None]] = {}  # cursor -> etag, ids, next

    async def scored() -> set[str]:
        found: set[str] = set()
        cursor = None
        while True:
            query = params | {"limit": PAGE} | ({"cursor": cursor} if cursor else {})
            cached = cache.get(cursor)
            headers = {"If-None-Match": cached[0]} if cached else {}
            response = await client.get(path, params=query, headers=headers)
            if response.status_code == 304 and cached:
                ids, following = cached[1], cached[2]
            else:
                page = response.json()
                ids = {o["id"] for o in page["items"] if is_scored(o)}
                following = page["next"]
                if etag := response.headers.get("etag"):
                    cache[cursor] = (etag, ids, following)
            found |= ids
            cursor = following
            if cursor is None:
                return found

    return scored


# --- measurements ---------------------------------------------------------------------------


def latency_batches(seconds: float) -> int:
    """Batches offered at ``RATE`` for ``seconds``."""
    return max(1, int(seconds * RATE / BATCH))


async def throughput(send: Send, batches: int) -> float:
    """Observations/s, two batches in flight (an app syncs one batch at a time; two apps),
    each done once its photos are stored."""
    queue = iter(range(batches))

    async def worker() -> None:
        for _ in queue:
            await send(lambda ids: None)

    started = time.perf_counter()
    await asyncio.gather(worker(), worker())
    return batches * BATCH / (time.perf_counter() - started)


async def visible_latency(send: Send, scored: Scored, seconds: float) -> tuple[float, int]:
    """(p95 in s, observations) from the start of each batch's sync call to its
    observations' scores being visible, at ``RATE``. An observation counts as seen once the
    sync has answered (its photo may still be uploading: the uploads go on, at the offered
    rate, and an observation whose batch failed, photos included, is never seen). The
    watcher refreshes the list every ``POLL_INTERVAL``, as an app would."""
    sent: dict[str, float] = {}
    seen: dict[str, float] = {}
    failed = 0
    done = asyncio.Event()

    async def watch() -> None:
        deadline = None
        while not done.is_set() or len(seen) < len(sent):
            now = time.perf_counter()
            if done.is_set():
                deadline = deadline or now + VISIBLE_TIMEOUT
                if now > deadline:
                    break
            for observation_id in await scored() - seen.keys():
                if observation_id in sent:
                    seen[observation_id] = time.perf_counter()
            await asyncio.sleep(max(0.0, POLL_INTERVAL - (time.perf_counter() - now)))

    async def offer() -> None:
        tasks = []
        for _ in range(latency_batches(seconds)):
            started = time.perf_counter()

            async def one(at: float = started) -> None:
                nonlocal failed
                synced: list[str] = []

                def register(ids: list[str]) -> None:
                    synced.extend(ids)
                    sent.update(dict.fromkeys(ids, at))

                try:
                    await send(register)
                except RuntimeError as exc:  # overloaded: counted as never visible
                    log.warning("a batch failed: %s", str(exc)[:300])
                    for observation_id in synced:
                        sent.pop(observation_id, None)
                        seen.pop(observation_id, None)
                    failed += BATCH

            tasks.append(asyncio.create_task(one()))
            await asyncio.sleep(max(0.0, BATCH / RATE - (time.perf_counter() - started)))
        await asyncio.gather(*tasks)
        done.set()

    await asyncio.gather(watch(), offer())
    # Never seen, or failed: infinitely late.
    latencies = sorted(
        [seen.get(i, float("inf")) - at for i, at in sent.items()] + [float("inf")] * failed
    )
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
    log.info("%d of %d observations scored visibly", len(seen), len(latencies))
    return p95, len(latencies)


def rows(
    mode: str, rate: float, base_rate: float, p95: float, base_p95: float, n: int
) -> list[Result]:
    return [
        Result(
            SUITE,
            f"sync throughput, {mode}",
            rate,
            "obs/s",
            baseline=base_rate,
            target=f">= {TARGET_RATE:g} obs/s",
            met=rate >= TARGET_RATE,
            detail=f"batches of {BATCH}, one photo each; baseline: the same straight into ingest",
        ),
        Result(
            SUITE,
            f"p95 sync -> scored visible, {mode}",
            p95,
            "s",
            baseline=base_p95,
            target=f"<= {TARGET_P95:g} s",
            met=p95 <= TARGET_P95,
            detail=(
                f"{n} observations at {RATE:g}/s, from the start of the sync call (its photo "
                f"uploads going on under the measurement) to scored in a list refreshed every "
                f"{POLL_INTERVAL:g} s; baseline: ingest batch write -> score in ingest's list"
            ),
        ),
    ]


# --- embedded -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def embedded(data_dir: Path) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """(MOBIS as one app user, ingest) in one process on one in-process bus."""
    from c4c.ingest.app import create_app as create_ingest
    from c4c.ingest.settings import IngestSettings
    from c4c.mobis.app import create_app as create_mobis
    from c4c.mobis.settings import MobisSettings
    from c4c.quality.app import create_app as create_quality
    from c4c.quality.settings import QualitySettings
    from c4c.shared.app import run_together
    from c4c.shared.bus import bus_from_settings

    common: dict[str, Any] = {
        "data_dir": data_dir,
        "outbox_poll_interval": 0.05,
        "log_level": "WARNING",
        "principal_secret": SECRET,
    }
    mobis_settings = MobisSettings(**common)
    bus = bus_from_settings(mobis_settings)
    apps = [
        create_ingest(IngestSettings(**common), bus=bus),
        create_quality(QualitySettings(**common), bus=bus),
        create_mobis(mobis_settings, bus=bus),
    ]
    async with run_together([a.state.runtime for a in apps], bus):
        transports = [httpx.ASGITransport(app=a) for a in apps]
        async with (
            httpx.AsyncClient(
                transport=transports[2], base_url="http://mobis", timeout=60
            ) as mobis,
            httpx.AsyncClient(
                transport=transports[1], base_url="http://quality", timeout=60
            ) as quality,
            httpx.AsyncClient(
                transport=transports[0], base_url="http://ingest", timeout=60
            ) as ingest,
        ):
            await _ready([ingest, quality, mobis], lambda: True)
            await sign_in(mobis)
            yield mobis, ingest


async def sign_in(mobis: httpx.AsyncClient) -> None:
    """Register a user and send its principal on every request, as the gateway would."""
    from c4c.shared.auth import PRINCIPAL_HEADER, Principal, sign_principal

    account = await mobis.post(
        "/mobis/v1/auth/register",
        json={"email": f"bench-{uuid.uuid4().hex[:8]}@example.org", "password": "bench password"},
    )
    if account.status_code != 201:
        raise RuntimeError(account.text)
    principal = Principal("user", account.json()["id"], scopes=frozenset({"mobis"}))

    class AsUser(httpx.Auth):
        def auth_flow(self, request: httpx.Request) -> Any:
            request.headers[PRINCIPAL_HEADER] = sign_principal(principal, SECRET.encode())
            yield request

    mobis.auth = AsUser()


# --- distributed ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def distributed(
    data_dir: Path, broker_url: str
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    run = LocalRun(
        dict.fromkeys(SERVICES, ()),
        broker_url,
        POSTGRES_URL,
        data_dir,
        gateway=False,
        label="bench",
    )
    env = run.environment(
        C4C_LOG_LEVEL="WARNING", C4C_OUTBOX_POLL_INTERVAL="0.05", C4C_PRINCIPAL_SECRET=SECRET
    )
    processes = Processes(run.components, env, data_dir)
    try:
        # The apps' side on aiohttp's connections (httpx's own pool: ~1.3 ms more CPU a
        # request, taken from the two cores the services are measured on; an app is not on
        # them). Both ways in, through MOBIS and straight into ingest, alike.
        async with (
            httpx.AsyncClient(
                base_url=run.url("mobis"), timeout=60, transport=apps_transport()
            ) as mobis,
            httpx.AsyncClient(
                base_url=run.url("ingest"), timeout=60, transport=apps_transport()
            ) as ingest,
            httpx.AsyncClient(base_url=run.url("quality"), timeout=2) as quality,
        ):
            await _ready([ingest, quality, mobis], lambda: not processes.exited())
            await sign_in(mobis)
            yield mobis, ingest
    finally:
        processes.stop()
        await run.forget()


async def _ready(services: Sequence[httpx.AsyncClient], alive: Callable[[], bool]) -> None:
    """Wait until every service says it is ready (quality: once its taxonomy and geography
    are loaded, so the measurements are of the steady state, not of a start)."""
    deadline = time.monotonic() + 120
    for service in services:
        while True:
            if not alive():
                raise RuntimeError("a service exited while starting; see its log")
            with contextlib.suppress(httpx.TransportError):
                if (await service.get("/readyz", timeout=2)).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{service.base_url} not ready")
            await asyncio.sleep(0.2)


def apps_transport() -> AiohttpTransport:
    return AiohttpTransport(max_connections=MAX_CONNECTIONS, keepalive_seconds=KEEPALIVE_SECONDS)


async def _services_up(broker_url: str) -> None:
    import aio_pika
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    try:
        connection = await aio_pika.connect(broker_url, timeout=5)
        await connection.close()
        engine = create_async_engine(POSTGRES_URL)
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        await engine.dispose()
    except Exception as exc:
        raise ServiceUnavailable(f"RabbitMQ or PostgreSQL unreachable: {exc!r}") from exc


# --- the suite ------------------------------------------------------------------------------


async def measure(mode: str, suite: Callable[[], Any], ctx: Context) -> list[Result]:
    batches = THROUGHPUT_QUICK if ctx.quick else THROUGHPUT_BATCHES
    seconds = LATENCY_QUICK if ctx.quick else LATENCY_SECONDS
    unused = photos(2 * BATCH * (batches + latency_batches(seconds)))
    async with suite() as (mobis, ingest):
        base_rate = await throughput(via_ingest(ingest, "bench-direct", unused), batches)
        rate = await throughput(via_mobis(mobis, "bench-mobis", unused), batches)
        base_p95, _ = await visible_latency(
            via_ingest(ingest, "bench-direct-latency", unused),
            scored_in_ingest(ingest, "bench-direct-latency"),
            seconds,
        )
        await sign_in(mobis)  # a new user: "my observations" holds only these
        p95, n = await visible_latency(
            via_mobis(mobis, "bench-mobis", unused), scored_in_mobis(mobis), seconds
        )
    log.info(
        "mobis %s: %.1f obs/s (direct %.1f), p95 %.3f s (direct %.3f)",
        mode,
        rate,
        base_rate,
        p95,
        base_p95,
    )
    return rows(mode, rate, base_rate, p95, base_p95, n)


async def run(ctx: Context) -> list[Result]:
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench-mobis-") as folder:
        root = Path(folder)
        (root / "embedded").mkdir()
        results += await measure("embedded", lambda: embedded(root / "embedded"), ctx)
        await _services_up(ctx.broker_url)
        (root / "distributed").mkdir()
        results += await measure(
            "distributed", lambda: distributed(root / "distributed", ctx.broker_url), ctx
        )
    return results
