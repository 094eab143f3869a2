"""End to end on the bus: an observation created through ingest's API is scored by the
quality service and the score written back into ingest, on both bus adapters; a photo
uploaded later is fetched through ingest's media URL and re-scores the observation."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from c4c.ingest.app import create_app as create_ingest
from c4c.ingest.settings import IngestSettings
from c4c.quality.app import create_app as create_quality
from c4c.quality.settings import QualitySettings
from c4c.shared.app import run_together
from c4c.shared.bus import BusOptions, EventBus, InProcessBus, RabbitMQBus

OBSERVATION = {
    "datasetID": "natusfera",
    "recordedBy": "user-1",
    "eventDate": "2024-05-03T10:15:00+02:00",
    "decimalLatitude": 41.3851,
    "decimalLongitude": 2.1734,
    "coordinateUncertaintyInMeters": 12.0,
    "countryCode": "ES",
    "scientificName": "Quercus ilexx",
    "license": "CC-BY",
}


@contextlib.asynccontextmanager
async def suite(tmp_path: Path, bus: EventBus, **common: Any) -> AsyncIterator[httpx.AsyncClient]:
    ingest = create_ingest(
        IngestSettings(data_dir=tmp_path, outbox_poll_interval=0.05, **common), bus
    )
    quality = create_quality(
        QualitySettings(data_dir=tmp_path, outbox_poll_interval=0.05, **common), bus
    )
    async with run_together([ingest.state.runtime, quality.state.runtime], bus, timeout=10):
        transport = httpx.ASGITransport(app=ingest, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://ingest.test") as c:
            yield c


async def scored_and_written_back(
    client: httpx.AsyncClient, eventually: Any, test_data: Path
) -> None:
    created = await client.post("/ingest/v1/observations", json=OBSERVATION)
    assert created.status_code == 201, created.text
    location = created.headers["Location"]

    async def quality() -> dict[str, Any]:
        body: dict[str, Any] = (await client.get(location)).json()["quality"]
        return body

    async def has_score() -> bool:
        return (await quality())["score"] is not None

    await eventually(has_score, timeout=60)
    first = await quality()
    codes = {f["code"] for f in first["flags"]}
    assert {"TAXON_MATCH_FUZZY", "MEDIA_MISSING"} <= codes
    assert first["grade"] == "casual"

    photo = next((test_data / "plants" / "Helianthus_annuus").glob("*.jpg")).read_bytes()
    uploaded = await client.post(
        f"{location}/media", content=photo, headers={"content-type": "image/jpeg"}
    )
    assert uploaded.status_code == 201, uploaded.text

    async def rescored_with_photo() -> bool:
        flags = {f["code"] for f in (await quality())["flags"]}
        return "MEDIA_MISSING" not in flags and "MULTIMEDIA_URI_INVALID" not in flags

    await eventually(rescored_with_photo, timeout=60)
    assert (await quality())["grade"] == "needs_id"


@pytest.mark.slow
async def test_scored_on_the_in_process_bus(
    tmp_path: Path, eventually: Any, test_data: Path
) -> None:
    async with suite(tmp_path, InProcessBus()) as client:
        await scored_and_written_back(client, eventually, test_data)


@pytest.mark.slow
@pytest.mark.rabbitmq
async def test_scored_over_rabbitmq(
    tmp_path: Path,
    broker_url: str,
    unique_name: Callable[[str], str],
    eventually: Any,
    test_data: Path,
) -> None:
    exchange, prefix = unique_name("events"), unique_name("q")
    bus = RabbitMQBus(broker_url, BusOptions(exchange=exchange), name="quality-e2e")
    common = {"bus_exchange": exchange, "bus_queue_prefix": prefix}
    async with suite(tmp_path, bus, **common) as client:
        await scored_and_written_back(client, eventually, test_data)
