"""Fixtures of the plantid tests: the built-in model built once per session, and the real
development photos (read from ../shared/data, never copied into the repository)."""

from __future__ import annotations

from pathlib import Path

import pytest

from c4c.plantid.engine.embedder import ModelSpec, default_model


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
