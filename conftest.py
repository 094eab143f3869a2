"""Fixtures for every test suite in the repository: real RabbitMQ and PostgreSQL when they
are there. On a laptop without them those tests skip; with ``C4C_REQUIRE_SERVICES=1`` (CI)
a missing service fails the test instead."""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parent
BROKER_URL = os.environ.get("C4C_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")
POSTGRES_URL = os.environ.get(
    "C4C_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
TEST_DATA = Path(os.environ.get("C4C_TEST_DATA", ROOT.parent / "shared" / "data"))


def services_required() -> bool:
    return os.environ.get("C4C_REQUIRE_SERVICES", "") not in ("", "0", "false")


def _unavailable(what: str) -> None:
    if services_required():
        pytest.fail(f"{what} is required (C4C_REQUIRE_SERVICES=1) but unreachable")
    pytest.skip(f"{what} unreachable; set C4C_REQUIRE_SERVICES=1 to make this a failure")


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url.replace("+asyncpg", ""))
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), 2
        ):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def broker_url() -> str:
    if not _reachable(BROKER_URL, 5672):
        _unavailable(f"RabbitMQ at {BROKER_URL}")
    return BROKER_URL


@pytest.fixture(scope="session")
def postgres_url() -> str:
    if not _reachable(POSTGRES_URL, 5432):
        _unavailable(f"PostgreSQL at {POSTGRES_URL}")
    return POSTGRES_URL


@pytest.fixture
async def postgres_schema(postgres_url: str) -> AsyncIterator[str]:
    """A fresh schema in the test database, dropped afterwards."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    schema = f"t_{uuid.uuid4().hex[:12]}"
    yield schema
    engine = create_async_engine(postgres_url)
    async with engine.begin() as conn:
        await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    await engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest) -> dict[str, str]:
    """Settings for a service's database: a test using it runs on SQLite (a file under the
    test's data dir) and on PostgreSQL (a schema of its own)."""
    if request.param == "sqlite":
        return {}
    url = request.getfixturevalue("postgres_url")
    schema = request.getfixturevalue("postgres_schema")
    return {"database_url": url, "database_schema": schema}


@pytest.fixture(scope="session")
def test_data() -> Path:
    """``../shared/data``: real photos and clips, never copied into the repository."""
    if not TEST_DATA.is_dir():
        if services_required():
            pytest.fail(f"test data missing at {TEST_DATA} (set C4C_TEST_DATA)")
        pytest.skip(f"test data missing at {TEST_DATA} (set C4C_TEST_DATA)")
    return TEST_DATA


async def wait_for(
    condition: Callable[[], bool | Awaitable[bool]],
    *,
    timeout: float = 10.0,
    interval: float = 0.01,
) -> None:
    """Wait until ``condition()`` (sync or async) holds; fail the test if it does not within
    ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


@pytest.fixture(scope="session")
def eventually() -> Callable[..., object]:
    """``await eventually(lambda: ...)``: wait for a condition instead of sleeping."""
    return wait_for


@pytest.fixture
def unique_name() -> Callable[[str], str]:
    """Names no other test (or a dev instance on the same broker) uses."""
    run = uuid.uuid4().hex[:8]
    return lambda base: f"test.{run}.{base}"
