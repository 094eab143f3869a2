"""Data-quality scoring, through the service's own batch endpoint
``POST /quality/v1/assessments:batch`` driven in process (httpx's ASGI transport: no
sockets, so the figures are the service's cost: JSON, validation, the rule sets, the bulk
reads of what the suite knows, every check and the grade, the answer's serialisation).

- metadata-only assessments/s on one core (one event loop; target ≥ 2,000/s), with the
  service's caches as configured (``context_ttl_s``), and with them off (every batch
  reads SQLite) for comparison; plus the bare scoring function (``rules.assess`` on
  prepared observations and contexts), the ceiling of the path;
- assessments/s with one 1280-px photo each (``image_workers=1``: one core) against bare
  OpenCV decoding of the same photo in the same run (target: the image checks cost ≤ 1.5 x
  the decode, i.e. the rate with the photo ≥ 1/1.5 of the decode rate). Each item has its
  own photo URL, so nothing is analysed once for several items. The photo checks decode
  once (OpenCV, reduced grayscale); Pillow only parses the header for the EXIF;
- the same with caches off once the service has seen a long history (``HISTORY``
  observations of the same observers and taxa, half of them accepted), against none seen:
  every batch reads each observer's counts and each taxon's latest accepted records, which
  should cost the same whatever came before (until 2026-11-24 they read every record of the
  observer and of the taxon); what remains is reading 2,000 records for each taxon;
- observations scored per CPU-second through the event consumers, as ingest's events bring
  them (issue #8): bursts of ``observation.created`` without media, then each one's
  ``observation.updated`` with its photo (distinct photos), timed until every observation's
  photo score has been relayed as ``observation.scored`` (the bus, the batch consumer, the
  reads, the photo checks, the write transaction, the outbox relay). Each observation is
  scored twice (on its creation, then with its photo). Against the :batch rate with one photo
  (the same checks, synchronous, nothing written): what the event path adds.

Observations vary in place, observer, name and date; the offline taxonomy and geography are
loaded, and the names matched, before timing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
from fastapi import FastAPI
from sqlalchemy import insert

from bench._core import Context, Result, median
from c4c.quality.app import create_app
from c4c.quality.models import ObserverCount, SeenObservation
from c4c.quality.rules import RuleSet, assess
from c4c.quality.rules.model import Context as RuleContext
from c4c.quality.schemas import ObservationIn
from c4c.quality.service import Knowledge, observation_from
from c4c.quality.settings import QualitySettings
from c4c.quality.wiring import Parts
from c4c.shared.bus import CloudEvent, new_event

SUITE = "quality"
METADATA, METADATA_QUICK = 4000, 1000
IMAGES, IMAGES_QUICK = 60, 10
BATCH_SIZE = 500
IMAGE_BATCH_SIZE = 10
EVENT_OBSERVATIONS, EVENT_OBSERVATIONS_QUICK = 100, 50
EVENT_BURST = 50
ROUNDS, ROUNDS_QUICK = 3, 1
HISTORY, HISTORY_QUICK = 200_000, 20_000
METADATA_TARGET = 2000.0
IMAGE_TARGET = 1 / 1.5
PHOTO_SIDE = 1280
NAMES = [
    "Quercus ilex",
    "Quercus suber",
    "Pinus halepensis",
    "Helianthus annuus",
    "Bellis perennis",
    "Galanthus nivalis",
    "Iris germanica",
    "Crocus vernus",
    "Anemone nemorosa",
    "Fritillaria meleagris",
    "Lilium lancifolium",
    "Convallaria majalis",
]
TEST_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PHOTO_URL = "http://photos.bench/p.jpg"


def observation(i: int, media: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "id": f"bench-{i}",
        "datasetID": "bench",
        "recordedBy": f"user-{i % 50}",
        "eventDate": f"2024-{1 + i % 12:02d}-{1 + i % 28:02d}",
        "decimalLatitude": 36.0 + (i % 997) * 0.007,
        "decimalLongitude": -8.0 + (i % 991) * 0.011,
        "coordinateUncertaintyInMeters": 10.0,
        "countryCode": "ES",
        "scientificName": NAMES[i % len(NAMES)],
        "basisOfRecord": "HumanObservation",
        "media": media or [],
        "identifications": [
            {"identifiedBy": "a", "scientificName": NAMES[i % len(NAMES)]},
            {"identifiedBy": "b", "scientificName": NAMES[(i + i % 2) % len(NAMES)]},
        ],
    }


def with_photo(i: int) -> dict[str, Any]:
    return observation(i, [{"id": f"m-{i}", "url": f"{PHOTO_URL}?n={i}", "type": "image"}])


def photo_1280(index: int = 0) -> bytes:
    """The ``index``-th photo: the test data's in turn, mirrored after the first pass (a
    mirror image is far from its original in perceptual hash), else synthetic ones."""
    sources = sorted((TEST_DATA / "plants").glob("*/*.jpg"))
    if not sources:
        # No test data here: a textured synthetic photo of the same size.
        rng = np.random.default_rng(7 + index)
        image = cv2.GaussianBlur(rng.integers(0, 255, (960, 1280, 3), dtype=np.uint8), (5, 5), 0)
    else:
        image = cv2.imread(str(sources[index % len(sources)]))
        scale = PHOTO_SIDE / max(image.shape[:2])
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        mirror = index // len(sources) % 4  # 1: left-right, 2: upside down, 3: both
        if mirror:
            image = cv2.flip(image, {1: 1, 2: 0, 3: -1}[mirror])
    return bytes(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())


class OnePhoto:
    def __init__(self, data: bytes) -> None:
        self.data = data

    async def fetch(self, url: str, *, max_bytes: int) -> bytes:
        return self.data


class PhotoPerUrl:
    """A photo of its own for each URL (by the ``n`` of ``?n=``): one photo for all would
    make every observation a duplicate of all the others."""

    def __init__(self, photos: list[bytes]) -> None:
        self.photos = photos

    async def fetch(self, url: str, *, max_bytes: int) -> bytes:
        return self.photos[int(url.rsplit("=", 1)[1])]


class Clock:
    """Wall and CPU time of a stretch of work. The machine is shared: the CPU time the
    process spent (every thread: event loop, SQLite's, the photo worker) is the cost per
    core; the wall time also counts waiting for other processes."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *_: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


async def batch_rate(
    client: httpx.AsyncClient, make: Any, count: int, batch_size: int
) -> tuple[float, float]:
    """Observations assessed per CPU second and per wall second through ``:batch``; the
    client's JSON work (bodies encoded beforehand, answers checked after) is left out."""
    bodies = [
        json.dumps([make(i) for i in range(start, min(start + batch_size, count))]).encode()
        for start in range(0, count, batch_size)
    ]
    headers = {"content-type": "application/json"}
    with Clock() as clock:
        responses = [
            await client.post("/quality/v1/assessments:batch", content=body, headers=headers)
            for body in bodies
        ]
    for response in responses:
        assert response.status_code == 200, response.text
        assert all(item["status"] == "assessed" for item in response.json()["items"])
    return count / clock.cpu, count / clock.wall


async def scoring_rate(knowledge: Knowledge, count: int) -> float:
    """The bare scoring function on prepared observations and contexts."""
    observations = [
        observation_from(ObservationIn.model_validate(observation(i))) for i in range(count)
    ]
    names = {
        n
        for o in observations
        for n in [o.scientific_name, *(i.scientific_name for i in o.identifications)]
        if n
    }
    matches = await knowledge.matches(names)
    taxa = {name: m.taxon for name, m in matches.items() if m.taxon is not None}
    now, ruleset = datetime.now(UTC), RuleSet("bench")
    contexts = [
        RuleContext(
            now=now,
            geography=knowledge.geography,
            taxon_match=matches[o.scientific_name or ""],
            taxon_of=taxa.get,
        )
        for o in observations
    ]
    with Clock() as clock:
        for obs, context in zip(observations, contexts, strict=True):
            assess(obs, context, ruleset)
    return count / clock.cpu


async def event_rate(parts: Parts, count: int, run: int) -> float:
    """Observations scored per CPU-second through the bus, as ingest's events bring them: a
    burst of creations, then each one's photo; done when every photo score was relayed.
    Run ``run`` takes the photos ``run * count`` onwards."""
    bus = parts.runtime.bus
    with_photo: set[str] = set()
    done = asyncio.Event()
    prefix = f"r{run}-"

    async def scored(event: CloudEvent) -> None:
        data = event.data
        if data["observation_id"].startswith(prefix) and data["observation_version"] == 2:
            with_photo.add(data["observation_id"])
            if len(with_photo) == count:
                done.set()

    await bus.subscribe(f"bench.scored.{run}", ["observation.scored"], scored)

    def created(i: int) -> CloudEvent:
        body = observation(i) | {"id": f"{prefix}{i}", "version": 1}
        return new_event("ingest", "observation.created", body, subject=f"observation/{prefix}{i}")

    def updated(i: int) -> CloudEvent:
        url = f"{PHOTO_URL}?n={run * count + i}"
        media = [{"id": f"{prefix}m-{i}", "url": url, "type": "image"}]
        data = {"id": f"{prefix}{i}", "version": 2, "changed": {"media": media}}
        return new_event("ingest", "observation.updated", data, subject=f"observation/{prefix}{i}")

    with Clock() as clock:
        for start in range(0, count, EVENT_BURST):
            burst = range(start, min(start + EVENT_BURST, count))
            await asyncio.gather(*(bus.publish(created(i)) for i in burst))
            await asyncio.gather(*(bus.publish(updated(i)) for i in burst))
        await asyncio.wait_for(done.wait(), timeout=600)
    return count / clock.cpu


async def seed_history(parts: Parts, count: int) -> None:
    """``count`` observations seen before, of the bench's observers and taxa, half of them
    accepted (research grade), written straight into the service's database."""
    now = datetime.now(UTC)
    rows = [
        {
            "id": f"seen-{i}",
            "version": 1,
            "project": "bench",
            "recorded_by": f"user-{i % 50}",
            "taxon": NAMES[i % len(NAMES)],
            "latitude": 36.0 + (i % 997) * 0.007,
            "longitude": -8.0 + (i % 991) * 0.011,
            "day_of_year": 1 + i % 365,
            "grade": "research" if i % 2 else "needs_id",
            "body": {},
            "measurements": [],
            "deleted": False,
            "updated_at": now - timedelta(seconds=i),
        }
        for i in range(count)
    ]
    counts: dict[str, dict[str, Any]] = {}
    for row in rows:
        kept = counts.setdefault(
            row["recorded_by"], {"recorded_by": row["recorded_by"], "total": 0, "research": 0}
        )
        kept["total"] += 1
        kept["research"] += row["grade"] == "research"
    async with parts.runtime.db.sessions() as session, session.begin():
        for start in range(0, count, 5000):
            await session.execute(insert(SeenObservation), rows[start : start + 5000])
        await session.execute(insert(ObserverCount), list(counts.values()))  # as kept


def decode_rate(data: bytes, count: int) -> float:
    buffer = np.frombuffer(data, dtype=np.uint8)
    with Clock() as clock:
        for _ in range(count):
            cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    return count / clock.cpu


@contextlib.asynccontextmanager
async def service(
    tmp: str, photo: bytes, **settings: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, Parts]]:
    app: FastAPI = create_app(
        QualitySettings(data_dir=Path(tmp), preload=False, image_workers=1, **settings)
    )
    parts: Parts = app.state.parts
    parts.media = OnePhoto(photo)
    async with app.router.lifespan_context(app):
        await parts.knowledge.load()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://quality.bench") as c:
            await batch_rate(c, observation, 2 * BATCH_SIZE, BATCH_SIZE)  # names matched
            yield c, parts


async def run(ctx: Context) -> list[Result]:
    metadata_n = METADATA_QUICK if ctx.quick else METADATA
    images_n = IMAGES_QUICK if ctx.quick else IMAGES
    rounds = ROUNDS_QUICK if ctx.quick else ROUNDS
    events_n = EVENT_OBSERVATIONS_QUICK if ctx.quick else EVENT_OBSERVATIONS
    history_n = HISTORY_QUICK if ctx.quick else HISTORY
    photo = photo_1280()
    photos = [photo_1280(i) for i in range(rounds * events_n)]
    metadata, walls, uncached, scoring, image_rates, decode_rates = [], [], [], [], [], []
    with_history: list[float] = []
    event_rates: list[float] = []
    with (
        tempfile.TemporaryDirectory() as cached_dir,
        tempfile.TemporaryDirectory() as bare_dir,
        tempfile.TemporaryDirectory() as history_dir,
    ):
        async with (
            service(cached_dir, photo) as (client, parts),
            service(bare_dir, photo, context_ttl_s=0) as (uncached_client, _),
            service(history_dir, photo, context_ttl_s=0) as (history_client, history_parts),
        ):
            await seed_history(history_parts, history_n)
            # Interleaved, so that the machine's other load falls on every variant alike.
            for _ in range(rounds):
                cpu, wall = await batch_rate(client, observation, metadata_n, BATCH_SIZE)
                metadata.append(cpu)
                walls.append(wall)
                uncached.append(
                    (await batch_rate(uncached_client, observation, metadata_n, BATCH_SIZE))[0]
                )
                with_history.append(
                    (await batch_rate(history_client, observation, metadata_n, BATCH_SIZE))[0]
                )
                scoring.append(await scoring_rate(parts.knowledge, metadata_n))
                decode_rates.append(decode_rate(photo, images_n))
                image_rates.append(
                    (await batch_rate(client, with_photo, images_n, IMAGE_BATCH_SIZE))[0]
                )
                parts.media = PhotoPerUrl(photos)
                event_rates.append(await event_rate(parts, events_n, len(event_rates)))
                parts.media = OnePhoto(photo)
    decodes, images = median(decode_rates), median(image_rates)
    rate, scored = median(metadata), median(scoring)
    return [
        Result(
            SUITE,
            "metadata-only assessments per CPU-second via :batch (1 core)",
            rate,
            "1/s",
            target=f">= {METADATA_TARGET:g}/s",
            met=rate >= METADATA_TARGET,
            detail=f"{metadata_n} observations in batches of {BATCH_SIZE} x {rounds} rounds; "
            f"HTTP in process, bulk SQLite reads, caches on; wall clock {median(walls):.0f}/s",
        ),
        Result.against(
            SUITE,
            "metadata-only assessments per CPU-second via :batch, caches off",
            median(uncached),
            "1/s",
            baseline=rate,
            baseline_name="the same with caches",
            detail="context_ttl_s=0: every batch reads observers, taxa, machine ids in bulk",
        ),
        Result.against(
            SUITE,
            f"the same, caches off, after {history_n:,} observations seen",
            median(with_history),
            "1/s",
            baseline=median(uncached),
            baseline_name="caches off, none seen",
            detail="of the same 50 observers and 12 taxa, half accepted: every batch reads "
            "each observer's kept counts and each taxon's latest 2,000 accepted records",
        ),
        Result.against(
            SUITE,
            "bare scoring function rules.assess per CPU-second",
            scored,
            "1/s",
            baseline=rate,
            baseline_name="assessments via :batch",
            detail="prepared observations and contexts: the ceiling of the path",
        ),
        Result.against(
            SUITE,
            f"assessments per CPU-second with one {PHOTO_SIDE}-px photo",
            images,
            "1/s",
            baseline=decodes,
            baseline_name="bare cv2.imdecode of the photo",
            min_ratio=IMAGE_TARGET,
            detail=f"{len(photo)} bytes JPEG, batches of {IMAGE_BATCH_SIZE}, one worker thread; "
            "ratio >= 0.67 means checks <= 1.5 x decode",
        ),
        Result.against(
            SUITE,
            "observations scored per CPU-second via events (created, then its photo)",
            median(event_rates),
            "1/s",
            baseline=images,
            baseline_name="assessments with one photo via :batch",
            detail=f"{events_n} observations in bursts of {EVENT_BURST} (creations, then their "
            f"photos' updates) through the in-process bus, each scored twice, until every photo "
            f"score is relayed: {1000 / median(event_rates):.1f} ms of CPU per observation",
        ),
    ]
