"""Fixtures of the quality tests: the service on SQLite and on PostgreSQL, and a fake media
source in place of the suite's HTTP clients."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from c4c.quality.app import create_app
from c4c.quality.settings import QualitySettings
from c4c.shared.problems import ProblemError


class FakeMedia:
    """Media by URL from a dict; unknown URLs fail as the suite's fetch does."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    async def fetch(self, url: str, *, max_bytes: int) -> bytes:
        if url not in self.files:

            class Refused(ProblemError):
                status, code, title = 422, "url-refused", "URL refused"

            raise Refused(f"{url} is refused.")
        return self.files[url]


@pytest.fixture
def settings(tmp_path: Path, database: dict[str, str]) -> QualitySettings:
    return QualitySettings(data_dir=tmp_path, outbox_poll_interval=0.05, **database)


@pytest.fixture
def media() -> FakeMedia:
    return FakeMedia()


@pytest.fixture
async def app(settings: QualitySettings, media: FakeMedia) -> AsyncIterator[FastAPI]:
    app = create_app(settings)
    app.state.parts.media = media  # the media port: a fake, not the network
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://quality.test") as client:
        yield client


def _observation(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "0b7c6f5e-1111-4c1e-9c4e-000000000001",
        "version": 1,
        "datasetID": "natusfera",
        "recordedBy": "user-1",
        "eventDate": "2024-05-03T10:15:00+02:00",
        "decimalLatitude": 41.3851,
        "decimalLongitude": 2.1734,
        "coordinateUncertaintyInMeters": 12.0,
        "countryCode": "ES",
        "scientificName": "Quercus ilex",
        "basisOfRecord": "HumanObservation",
        "media": [],
        "identifications": [],
    }
    body.update(overrides)
    return body


@pytest.fixture
def observation() -> Any:
    """A valid observation as ingest publishes it; keyword arguments override fields."""
    return _observation
