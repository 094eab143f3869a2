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
  own photo URL, so nothing is analysed once for several items.

Observations vary in place, observer, name and date; the offline taxonomy and geography are
loaded, and the names matched, before timing."""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
from fastapi import FastAPI

from bench._core import Context, Result, median
from c4c.quality.app import create_app
from c4c.quality.rules import RuleSet, assess
from c4c.quality.rules.model import Context as RuleContext
from c4c.quality.schemas import ObservationIn
from c4c.quality.service import Knowledge, observation_from
from c4c.quality.settings import QualitySettings
from c4c.quality.wiring import Parts

SUITE = "quality"
METADATA, METADATA_QUICK = 4000, 1000
IMAGES, IMAGES_QUICK = 60, 10
BATCH_SIZE = 500
IMAGE_BATCH_SIZE = 10
ROUNDS, ROUNDS_QUICK = 3, 1
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


def photo_1280() -> bytes:
    source = next(iter(sorted((TEST_DATA / "plants").glob("*/*.jpg"))), None)
    if source is None:
        # No test data here: a textured synthetic photo of the same size.
        rng = np.random.default_rng(7)
        image = cv2.GaussianBlur(rng.integers(0, 255, (960, 1280, 3), dtype=np.uint8), (5, 5), 0)
    else:
        image = cv2.imread(str(source))
        scale = PHOTO_SIDE / max(image.shape[:2])
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    return bytes(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())


class OnePhoto:
    def __init__(self, data: bytes) -> None:
        self.data = data

    async def fetch(self, url: str, *, max_bytes: int) -> bytes:
        return self.data


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
    photo = photo_1280()
    metadata, walls, uncached, scoring, image_rates, decode_rates = [], [], [], [], [], []
    with tempfile.TemporaryDirectory() as cached_dir, tempfile.TemporaryDirectory() as bare_dir:
        async with (
            service(cached_dir, photo) as (client, parts),
            service(bare_dir, photo, context_ttl_s=0) as (uncached_client, _),
        ):
            # Interleaved, so that the machine's other load falls on every variant alike.
            for _ in range(rounds):
                cpu, wall = await batch_rate(client, observation, metadata_n, BATCH_SIZE)
                metadata.append(cpu)
                walls.append(wall)
                uncached.append(
                    (await batch_rate(uncached_client, observation, metadata_n, BATCH_SIZE))[0]
                )
                scoring.append(await scoring_rate(parts.knowledge, metadata_n))
                decode_rates.append(decode_rate(photo, images_n))
                image_rates.append(
                    (await batch_rate(client, with_photo, images_n, IMAGE_BATCH_SIZE))[0]
                )
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
    ]
