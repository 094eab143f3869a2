"""Each installed service alone (as found by the gateway: entry points ``c4c.services``)
starts, is healthy and ready under its prefix, and documents itself."""

from __future__ import annotations

import os
import typing
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from c4c.shared.settings import ServiceSettings

EXPECTED = {
    "ingest": ("/ingest", "Observation ingestion"),
    "quality": ("/quality", "Data-quality scoring"),
    "video": ("/video", "Video stream processing"),
    "plantid": ("/plantid", "Plant identification"),
    "mobis": ("/mobis", "MOBIS mobile app backend"),
}
SERVICES = {entry.name: entry for entry in entry_points(group="c4c.services")}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.upper().startswith("C4C_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no .env from the checkout


def test_every_service_is_installed() -> None:
    assert set(SERVICES) == set(EXPECTED)


def settings_class(create_app: Callable[..., FastAPI]) -> type[ServiceSettings]:
    """The settings class a service's ``create_app(settings=...)`` takes."""
    hint = typing.get_type_hints(create_app)["settings"]
    [cls] = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    assert issubclass(cls, ServiceSettings)
    return cls


@pytest.mark.parametrize("name", sorted(EXPECTED))
async def test_service_alone_is_healthy_ready_and_documented(
    name: str, tmp_path: Path, eventually: Callable[..., Any]
) -> None:
    prefix, title = EXPECTED[name]
    if name not in SERVICES:
        pytest.fail(f"service {name} is not installed (entry point c4c.services)")
    create_app = SERVICES[name].load()
    settings = settings_class(create_app)(data_dir=tmp_path)
    assert settings.service_name == name
    app: FastAPI = create_app(settings)
    assert app.state.prefixes[0] == prefix

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url=f"http://{name}.test") as client,
    ):

        async def ready() -> bool:
            # A service may load data before it is ready (quality: its taxonomy).
            return (await client.get(f"{prefix}/readyz")).status_code == 200

        await eventually(ready, timeout=120, interval=0.2)
        answers: dict[str, Any] = {
            path: await client.get(path)
            for path in [
                "/healthz",
                f"{prefix}/healthz",
                f"{prefix}/readyz",
                "/openapi.json",
                f"{prefix}/openapi.json",
            ]
        }

    for path, answer in answers.items():
        assert answer.status_code == 200, (path, answer.text)
    alive = {"status": "alive", "service": name}
    assert answers["/healthz"].json() == alive
    assert answers[f"{prefix}/healthz"].json() == alive
    checks = answers[f"{prefix}/readyz"].json()["checks"]
    assert {"database", "bus"} <= checks.keys(), checks
    assert all(checks.values()), checks
    assert answers["/openapi.json"].json()["info"]["title"] == title
    assert answers[f"{prefix}/openapi.json"].json() == answers["/openapi.json"].json()
    assert (tmp_path / f"{name}.db").is_file()
