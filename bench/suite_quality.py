"""Data-quality scoring: metadata-only assessments/s (target ≥ 2,000/s on one core, i.e.
one event loop) and assessments/s with one 1280-px photo against bare OpenCV decoding of
the same photo in the same run (target: the image checks cost ≤ 1.5 x the decode, i.e.
the rate with the photo ≥ 1/1.5 of the decode rate).

The service's own assessment path is driven directly (``QualityService.assess``: payload
validation, the rule set read from SQLite, taxonomy and geography look-ups, every check,
the grade), without HTTP. Observations vary in place, name and date so caches do not
answer everything; the offline taxonomy and geography are loaded before timing."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench._core import Context, Result, median
from c4c.quality.app import create_app
from c4c.quality.schemas import ObservationIn
from c4c.quality.settings import QualitySettings
from c4c.quality.wiring import Parts

SUITE = "quality"
METADATA, METADATA_QUICK = 4000, 400
IMAGES, IMAGES_QUICK = 60, 10
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


def observation(i: int, media: list[dict[str, Any]] | None = None) -> ObservationIn:
    return ObservationIn.model_validate(
        {
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
    )


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


async def rate(parts: Parts, make: Any, count: int) -> float:
    async with parts.runtime.db.sessions() as session:
        service = parts.service(session)
        started = time.perf_counter()
        for i in range(count):
            await service.assess(make(i))
        return count / (time.perf_counter() - started)


def decode_rate(data: bytes, count: int) -> float:
    buffer = np.frombuffer(data, dtype=np.uint8)
    started = time.perf_counter()
    for _ in range(count):
        cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    return count / (time.perf_counter() - started)


async def run(ctx: Context) -> list[Result]:
    metadata_n = METADATA_QUICK if ctx.quick else METADATA
    images_n = IMAGES_QUICK if ctx.quick else IMAGES
    rounds = ROUNDS_QUICK if ctx.quick else ROUNDS
    photo = photo_1280()
    with tempfile.TemporaryDirectory() as tmp:
        settings = QualitySettings(data_dir=Path(tmp), preload=False)
        app = create_app(settings)
        parts: Parts = app.state.parts
        parts.media = OnePhoto(photo)
        async with app.router.lifespan_context(app):
            await parts.knowledge.load()
            await rate(parts, observation, 50)  # warm caches of the names used
            metadata = median([await rate(parts, observation, metadata_n) for _ in range(rounds)])
            with_photo = [{"id": "m", "url": PHOTO_URL, "type": "image"}]
            image_rates, decode_rates = [], []
            for _ in range(rounds):
                decode_rates.append(decode_rate(photo, images_n))
                image_rates.append(
                    await rate(parts, lambda i: observation(i, with_photo), images_n)
                )
    decodes = median(decode_rates)
    images = median(image_rates)
    return [
        Result(
            SUITE,
            "metadata-only assessments/s (1 core)",
            metadata,
            "1/s",
            target=f">= {METADATA_TARGET:g}/s",
            met=metadata >= METADATA_TARGET,
            detail=f"{metadata_n} observations x {rounds} rounds, rules + grade + SQLite reads",
        ),
        Result.against(
            SUITE,
            f"assessments/s with one {PHOTO_SIDE}-px photo",
            images,
            "1/s",
            baseline=decodes,
            baseline_name="bare cv2.imdecode of the photo",
            min_ratio=IMAGE_TARGET,
            detail=f"{len(photo)} bytes JPEG; ratio >= 0.67 means checks <= 1.5 x decode",
        ),
    ]
