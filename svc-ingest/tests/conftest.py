"""Fixtures of the ingest tests: the service on SQLite and on PostgreSQL (each test that
takes ``client`` runs on both), with media under the test's own folder."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from c4c.ingest.app import create_app
from c4c.ingest.settings import IngestSettings
from c4c.shared.bus import CloudEvent

PUBLIC_URL = "http://suite.test"


def _observation(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "datasetID": "natusfera",
        "recordedBy": "user-1",
        "eventDate": "2024-05-03T10:15:00+02:00",
        "decimalLatitude": 41.3851,
        "decimalLongitude": 2.1734,
        "coordinateUncertaintyInMeters": 12.0,
        "countryCode": "ES",
        "scientificName": "Quercus ilex",
        "taxonRank": "species",
        "vernacularName": "Holm oak",
        "license": "CC-BY",
    }
    body.update(overrides)
    return body


@pytest.fixture
def settings(tmp_path: Path, database: dict[str, str]) -> IngestSettings:
    return IngestSettings(
        data_dir=tmp_path, public_url=PUBLIC_URL, outbox_poll_interval=0.05, **database
    )


@pytest.fixture
async def app(settings: IngestSettings) -> AsyncIterator[FastAPI]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def events(app: FastAPI) -> list[CloudEvent]:
    """Every observation.* event the service publishes (through its outbox and bus)."""
    received: list[CloudEvent] = []

    async def record(event: CloudEvent) -> None:
        received.append(event)

    await app.state.runtime.bus.subscribe("test.recorder", ["observation.*"], record)
    return received


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://ingest.test") as client:
        yield client


@pytest.fixture
def new_id() -> Callable[[], str]:
    return lambda: str(uuid.uuid4())


Body = Callable[..., dict[str, Any]]


@pytest.fixture
def observation() -> Body:
    """A valid observation body; keyword arguments override fields."""
    return _observation
