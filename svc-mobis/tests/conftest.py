"""Fixtures of the MOBIS tests: MOBIS on SQLite and on PostgreSQL, in front of a real
ingest service in process (through ingest's HTTP API, as in production), with principals
signed as the gateway signs them: the app's user or address towards MOBIS, the service
"mobis" towards ingest."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from c4c.ingest.app import create_app as create_ingest
from c4c.ingest.settings import IngestSettings
from c4c.mobis.app import create_app
from c4c.mobis.remote import IngestOverHttp
from c4c.mobis.settings import MobisSettings
from c4c.shared.auth import (
    PRINCIPAL_HEADER,
    Kind,
    Principal,
    ensure_principal_secret,
    sign_principal,
)

PASSWORD = "correct horse battery"
INGEST_SECRET = b"the secret ingest shares with the gateway in these tests"


class SignedAs(httpx.Auth):
    """Signs each request as the gateway would, for ``principal``."""

    def __init__(self, principal: Principal, secret: bytes) -> None:
        self.principal = principal
        self.secret = secret

    def auth_flow(self, request: httpx.Request) -> Any:
        request.headers[PRINCIPAL_HEADER] = sign_principal(self.principal, self.secret)
        yield request


@pytest.fixture
def settings(tmp_path: Path, database: dict[str, str]) -> MobisSettings:
    ensure_principal_secret(MobisSettings(data_dir=tmp_path))
    return MobisSettings(
        data_dir=tmp_path,
        outbox_poll_interval=0.05,
        password_min_length=10,
        password_hash_memory_kib=1024,
        password_hash_time_cost=1,
        login_free_failures_per_ip=8,
        sse_poll_seconds=0.2,
        reservation_settle_seconds=3600,  # the tests drive the settler's passes
        **database,
    )


@pytest.fixture
async def ingest_app(tmp_path: Path) -> AsyncIterator[FastAPI]:
    app = create_ingest(
        IngestSettings(
            data_dir=tmp_path / "ingest",
            public_url="http://suite.test",
            principal_secret=SecretStr(INGEST_SECRET.decode()),
        )
    )
    async with app.router.lifespan_context(app):
        yield app


def _ingest_as(app: FastAPI, kind: Kind, principal_id: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    principal = Principal(kind, principal_id, scopes=frozenset({"*"}))
    return httpx.AsyncClient(
        transport=transport,
        base_url="http://ingest.test",
        auth=SignedAs(principal, INGEST_SECRET),
    )


@pytest.fixture
async def ingest_client(ingest_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Ingest as MOBIS calls it: as the service "mobis"."""
    async with _ingest_as(ingest_app, "service", "mobis") as client:
        yield client


@pytest.fixture
async def importer(ingest_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Ingest as another client calls it: an observatory's importer, with an API key."""
    async with _ingest_as(ingest_app, "api-key", "importer-key") as client:
        yield client


@pytest.fixture
async def app(settings: MobisSettings, ingest_client: httpx.AsyncClient) -> AsyncIterator[FastAPI]:
    app = create_app(settings, ingest=IngestOverHttp(lambda: ingest_client))
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def anonymous(app: FastAPI, settings: MobisSettings) -> AsyncIterator[httpx.AsyncClient]:
    """A client on a public route, as the gateway passes it: anonymous, by address."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    secret = ensure_principal_secret(settings)

    class Gateway(httpx.Auth):
        def auth_flow(self, request: httpx.Request) -> Any:
            who = request.headers.pop("x-test-user", None)
            address = request.headers.pop("x-test-address", "198.51.100.7")
            principal = (
                Principal("user", who, scopes=frozenset({"mobis"}))
                if who
                else Principal("anonymous", address)
            )
            request.headers[PRINCIPAL_HEADER] = sign_principal(principal, secret)
            yield request

    async with httpx.AsyncClient(
        transport=transport, base_url="http://mobis.test", auth=Gateway()
    ) as client:
        yield client


User = Callable[..., Any]


@pytest.fixture
def signed_up(anonymous: httpx.AsyncClient) -> User:
    """``await signed_up(email)`` → (user id, headers that call as that user)."""

    async def make(email: str, password: str = PASSWORD) -> tuple[str, dict[str, str]]:
        answer = await anonymous.post(
            "/mobis/v1/auth/register",
            json={"email": email, "password": password, "displayName": email.split("@")[0]},
        )
        assert answer.status_code == 201, answer.text
        user_id = answer.json()["id"]
        return user_id, {"x-test-user": user_id}

    return make


@pytest.fixture
def observation() -> Callable[..., dict[str, Any]]:
    """A valid observation as the app sends it; keyword arguments override fields."""
    return _observation


def _observation(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "datasetID": "natusfera",
        "eventDate": "2024-05-03T10:15:00+02:00",
        "decimalLatitude": 41.3851,
        "decimalLongitude": 2.1734,
        "scientificName": "Bellis perennis",
        "license": "CC-BY",
    }
    return body | overrides
