"""A service trusts only the gateway: with ``require_principal`` it refuses calls without
the gateway's signed principal (health and docs excepted), and it reads the caller from it.
Embedded behind the gateway, every service gets the principal through the same secret."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from fastapi import APIRouter, FastAPI

from c4c.gateway.app import create_app
from c4c.gateway.settings import GatewaySettings
from c4c.shared.app import create_service_app
from c4c.shared.auth import PRINCIPAL_MAX_AGE, Principal, PrincipalDep, sign_principal
from c4c.shared.settings import ServiceSettings

SECRET = "a-secret-the-gateway-and-services-share"


class DemoSettings(ServiceSettings):
    service_name: ClassVar[str] = "demo"


def demo_app(tmp_path: Path, **overrides: Any) -> FastAPI:
    router = APIRouter()

    @router.get("/demo/v1/whoami")
    async def whoami(principal: PrincipalDep) -> dict[str, Any]:
        return {"kind": principal.kind, "id": principal.id} if principal else {}

    settings = DemoSettings(data_dir=tmp_path, principal_secret=SECRET, **overrides)
    return create_service_app(
        settings, title="Demo", description="", version="0", prefixes=["/demo"], routers=[router]
    )


@pytest.fixture
async def strict(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = demo_app(tmp_path, require_principal=True)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://demo") as client,
    ):
        yield client


ALICE = Principal("user", "alice", None, frozenset({"demo"}))


@pytest.mark.parametrize(
    "header",
    [
        None,
        sign_principal(ALICE, b"another secret"),
        sign_principal(ALICE, SECRET.encode(), now=time.time() - PRINCIPAL_MAX_AGE - 5),
        "garbage",
        sign_principal(ALICE, SECRET.encode())[:-3] + "AAA",
    ],
    ids=["missing", "wrong secret", "stale", "garbage", "tampered"],
)
async def test_a_strict_service_refuses_calls_not_from_the_gateway(
    strict: httpx.AsyncClient, header: str | None
) -> None:
    headers = {"X-C4C-Principal": header} if header else {}
    response = await strict.get("/demo/v1/whoami", headers=headers)
    assert response.status_code == 401, response.text
    assert response.json()["type"] == "urn:c4c:problem:invalid-principal"


async def test_a_strict_service_takes_the_gateways_principal(strict: httpx.AsyncClient) -> None:
    header = sign_principal(ALICE, SECRET.encode())
    response = await strict.get("/demo/v1/whoami", headers={"X-C4C-Principal": header})
    assert response.json() == {"kind": "user", "id": "alice"}


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/demo/healthz", "/demo/openapi.json"])
async def test_a_strict_service_still_answers_health_and_docs(
    strict: httpx.AsyncClient, path: str
) -> None:
    assert (await strict.get(path)).status_code == 200


async def test_a_lenient_service_serves_anonymous_calls(tmp_path: Path) -> None:
    app = demo_app(tmp_path)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://demo") as client,
    ):
        assert (await client.get("/demo/v1/whoami")).json() == {}


async def test_embedded_services_requiring_it_get_it_through_the_gateway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.upper().startswith("C4C_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("C4C_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("C4C_REQUIRE_PRINCIPAL", "1")  # every service, not the gateway
    monkeypatch.chdir(tmp_path)
    app = create_app(GatewaySettings())
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as client,
    ):
        key = (tmp_path / "dev-api-key").read_text().strip()
        through = await client.get("/ingest/no-such-route", headers={"X-API-Key": key})
        ingest = app.state.proxy.table.match("/ingest").upstream.replicas[0].client
        around = await ingest.get("/ingest/no-such-route")
    assert through.status_code == 404  # the service let the gateway's call in
    assert around.status_code == 401  # and nobody else's
    assert (tmp_path / "principal-secret").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "dev-api-key").stat().st_mode & 0o777 == 0o600
