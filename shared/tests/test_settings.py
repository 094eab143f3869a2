"""Where a setting comes from: init kwargs, then the service's own section
(``C4C_<SERVICE>_*``), then the suite-wide name (``C4C_*``), then ``.env`` (the same two
names, in the same order), then defaults."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import pytest
from pydantic import ValidationError

from c4c.shared.settings import ServiceSettings


class DemoSettings(ServiceSettings):
    service_name: ClassVar[str] = "demo"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No C4C_* variable from the outside world, and no .env but the test's own."""
    for name in list(os.environ):
        if name.upper().startswith("C4C_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_defaults_put_sqlite_and_media_under_data_dir(tmp_path: Path) -> None:
    settings = DemoSettings(data_dir=tmp_path)
    assert settings.database_url is None
    assert settings.resolved_database_url == f"sqlite+aiosqlite:///{tmp_path}/demo.db"
    assert settings.resolved_media_dir == tmp_path / "media"
    assert settings.resolved_database_schema == "demo"
    assert settings.broker_url is None


def test_default_data_dir_is_relative_data() -> None:
    settings = DemoSettings()
    assert settings.data_dir == Path("data")
    assert settings.resolved_database_url == "sqlite+aiosqlite:///data/demo.db"
    assert settings.resolved_media_dir == Path("data/media")


def test_service_section_beats_suite_wide_which_beats_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert DemoSettings().resolved_database_url.startswith("sqlite+aiosqlite:///")

    monkeypatch.setenv("C4C_DATABASE_URL", "postgresql+asyncpg://suite/db")
    assert DemoSettings().resolved_database_url == "postgresql+asyncpg://suite/db"

    monkeypatch.setenv("C4C_DEMO_DATABASE_URL", "postgresql+asyncpg://demo/db")
    assert DemoSettings().resolved_database_url == "postgresql+asyncpg://demo/db"

    explicit = DemoSettings(database_url="postgresql+asyncpg://init/db")
    assert explicit.resolved_database_url == "postgresql+asyncpg://init/db"


def test_another_services_section_does_not_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("C4C_OTHER_DATABASE_URL", "postgresql+asyncpg://other/db")
    monkeypatch.setenv("C4C_OTHER_BUS_PREFETCH", "0")  # invalid, but not ours
    settings = DemoSettings()
    assert settings.database_url is None
    assert settings.bus_prefetch == 64


def test_sections_apply_field_by_field(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("C4C_DATA_DIR", str(tmp_path / "suite"))
    monkeypatch.setenv("C4C_BUS_PREFETCH", "8")
    monkeypatch.setenv("C4C_DEMO_BUS_PREFETCH", "16")
    monkeypatch.setenv("C4C_DEMO_MEDIA_DIR", str(tmp_path / "pictures"))
    settings = DemoSettings()
    assert settings.data_dir == tmp_path / "suite"
    assert settings.bus_prefetch == 16
    assert settings.resolved_media_dir == tmp_path / "pictures"
    assert settings.resolved_database_url == f"sqlite+aiosqlite:///{tmp_path}/suite/demo.db"


def test_environment_names_are_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("c4c_demo_log_level", "DEBUG")
    assert DemoSettings().log_level == "DEBUG"


def test_env_file_comes_after_the_environment(
    monkeypatch: pytest.MonkeyPatch, clean_environment: Path
) -> None:
    (clean_environment / ".env").write_text(
        "C4C_DATABASE_URL=postgresql+asyncpg://dotenv/db\nC4C_BUS_EXCHANGE=from.dotenv\n"
    )
    from_file = DemoSettings()
    assert from_file.database_url == "postgresql+asyncpg://dotenv/db"
    assert from_file.bus_exchange == "from.dotenv"

    monkeypatch.setenv("C4C_DATABASE_URL", "postgresql+asyncpg://environment/db")
    assert DemoSettings().database_url == "postgresql+asyncpg://environment/db"
    assert DemoSettings().bus_exchange == "from.dotenv"


def test_env_file_takes_service_sections_too(
    monkeypatch: pytest.MonkeyPatch, clean_environment: Path
) -> None:
    (clean_environment / ".env").write_text(
        "C4C_DEMO_PORT=8699\nC4C_PORT=8600\nC4C_BUS_PREFETCH=8\nC4C_DEMO_BUS_PREFETCH=16\n"
        "C4C_OTHER_LOG_LEVEL=DEBUG\n"
    )
    settings = DemoSettings()
    assert (settings.port, settings.bus_prefetch) == (8699, 16)
    assert settings.log_level == "INFO"  # another service's section

    monkeypatch.setenv("C4C_BUS_PREFETCH", "32")  # the environment beats the file
    assert DemoSettings().bus_prefetch == 32


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("C4C_BUS_PREFETCH", "0"),
        ("C4C_DEMO_BUS_PREFETCH", "0"),
        ("C4C_BUS_PREFETCH", "lots"),
        ("C4C_BUS_DELIVERY_LIMIT", "0"),
        ("C4C_BUS_PUBLISH_TIMEOUT", "0"),
        ("C4C_BUS_RETRY_BACKOFF", "-1"),
        ("C4C_MAX_BODY_BYTES", "-1"),
        ("C4C_SHUTDOWN_TIMEOUT", "0"),
        ("C4C_DEMO_PORT", "70000"),
        ("C4C_LOG_FORMAT", "xml"),
    ],
)
def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    field = name.removeprefix("C4C_").removeprefix("DEMO_").lower()
    with pytest.raises(ValidationError) as raised:
        DemoSettings()
    assert [error["loc"] for error in raised.value.errors()] == [(field,)]


def test_invalid_init_value_is_refused() -> None:
    with pytest.raises(ValidationError):
        DemoSettings(bus_prefetch=0)


def test_valid_service_section_overrides_invalid_suite_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("C4C_BUS_PREFETCH", "0")
    monkeypatch.setenv("C4C_DEMO_BUS_PREFETCH", "4")
    assert DemoSettings().bus_prefetch == 4
