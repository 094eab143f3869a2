"""Fixtures of the plantid tests: the built-in model built once per session, and the real
development photos (read from ../shared/data, never copied into the repository)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from c4c.plantid.app import create_app
from c4c.plantid.engine.embedder import ModelSpec, default_model
from c4c.plantid.settings import PlantidSettings


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One build of the EfficientNet-Lite0 ONNX model for the whole session."""
    cache = tmp_path_factory.mktemp("plantid-models")
    default_model(cache)
    return cache


@pytest.fixture(scope="session")
def model(model_cache: Path) -> ModelSpec:
    return default_model(model_cache)


@pytest.fixture
def plants(test_data: Path) -> Path:
    return test_data / "plants"


@pytest.fixture
async def plantid(
    tmp_path: Path, model_cache: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """The service in process, with its app."""
    app = create_app(
        PlantidSettings(data_dir=tmp_path, model_cache=model_cache, log_level="WARNING")
    )
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://plantid") as client:
            yield client, app


async def _metric(client: httpx.AsyncClient, name: str, **labels: str) -> float:
    text = (await client.get("/metrics")).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and sample.labels == labels
    )


@pytest.fixture
def metric() -> Callable[..., Awaitable[float]]:
    """``await metric(client, name, **labels)``: a sample of the service's ``/metrics`` (0
    when absent). The registry is the process', so tests compare before and after."""
    return _metric
