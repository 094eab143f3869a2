"""A service trusts only the gateway: with ``require_principal`` it refuses calls without
the gateway's signed principal (health and docs excepted), and it reads the caller from it.
Embedded behind the gateway, every service gets the principal through the same secret. Run
alone, a service given ``api_keys`` checks them itself."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from fastapi import APIRouter, FastAPI, Request
from pydantic import ValidationError
from starlette.responses import JSONResponse, Response

from c4c.gateway.app import create_app
from c4c.gateway.settings import GatewaySettings
from c4c.shared.app import create_service_app
from c4c.shared.auth import PRINCIPAL_MAX_AGE, Principal, PrincipalDep, sign_principal
from c4c.shared.problems import ProblemError
from c4c.shared.settings import ServiceSettings

SECRET = "a-secret-the-gateway-and-services-share"


class DemoSettings(ServiceSettings):
    service_name: ClassVar[str] = "demo"


def demo_app(
    tmp_path: Path, refusal_shapes: dict[str, Any] | None = None, **overrides: Any
) -> FastAPI:
    router = APIRouter()

    @router.get("/demo/v1/whoami")
    async def whoami(principal: PrincipalDep) -> dict[str, Any]:
        return {"kind": principal.kind, "id": principal.id} if principal else {}

    @router.get("/demo/v1/query")
    async def query(request: Request) -> dict[str, str]:
        return dict(request.query_params)

    settings = DemoSettings(**{"data_dir": tmp_path, "principal_secret": SECRET} | overrides)
    return create_service_app(
        settings,
        title="Demo",
        description="",
        version="0",
        prefixes=["/demo"],
        routers=[router],
        refusal_shapes=refusal_shapes,
    )


@contextlib.asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://demo") as client,
    ):
        yield client


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


async def test_a_service_without_the_secret_refuses_the_gateways_principal(
    tmp_path: Path,
) -> None:
    """A gateway in front that does not share its secret: its callers are refused, loudly,
    rather than all taken for anonymous (whose retries would replay each other's creates)."""
    header = {"X-C4C-Principal": sign_principal(ALICE, SECRET.encode())}
    async with serving(demo_app(tmp_path, principal_secret=None)) as client:
        refused = await client.get("/demo/v1/whoami", headers=header)
        health = await client.get("/healthz", headers=header)
        anonymous = await client.get("/demo/v1/whoami")
    assert refused.status_code == 401
    assert refused.json()["type"] == "urn:c4c:problem:invalid-principal"
    assert "C4C_PRINCIPAL_SECRET" in refused.json()["detail"]
    assert health.status_code == 200
    assert anonymous.json() == {}


KEYS = ["first-key-of-a-self-hosted-service", "second-key-of-a-self-hosted-service"]


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


async def test_a_service_run_alone_checks_its_own_api_keys(tmp_path: Path) -> None:
    async with serving(demo_app(tmp_path, api_keys=KEYS)) as client:
        for headers, params in [({}, {}), ({"X-API-Key": "wrong"}, {}), ({}, {"api-key": ""})]:
            refused = await client.get("/demo/v1/whoami", headers=headers, params=params)
            assert refused.status_code == 401, (headers, params)
            assert refused.json()["type"] == "urn:c4c:problem:invalid-api-key"
        by_header = await client.get("/demo/v1/whoami", headers={"X-API-Key": KEYS[0]})
        by_query = await client.get("/demo/v1/whoami", params={"api-key": KEYS[1]})
        through_gateway = await client.get(
            "/demo/v1/whoami", headers={"X-C4C-Principal": sign_principal(ALICE, SECRET.encode())}
        )
        health = await client.get("/demo/healthz")
        document = (await client.get("/demo/openapi.json")).json()
    assert by_header.json() == {"kind": "api-key", "id": key_id(KEYS[0])}
    assert by_query.json() == {"kind": "api-key", "id": key_id(KEYS[1])}
    assert through_gateway.json() == {"kind": "user", "id": "alice"}
    assert health.status_code == 200
    schemes = document["components"]["securitySchemes"]  # so that /docs sends a key
    assert {(s["in"], s["name"]) for s in schemes.values()} == {
        ("header", "X-API-Key"),
        ("query", "api-key"),
    }
    assert {name for option in document["security"] for name in option} == set(schemes)


async def test_a_key_reaches_no_handler(tmp_path: Path) -> None:
    """Read, the api-key parameter is taken out of the query: a handler's strict parameters,
    its links and logs never see it."""
    async with serving(demo_app(tmp_path, api_keys=KEYS)) as client:
        seen = await client.get("/demo/v1/query", params={"api-key": KEYS[0], "page": "2"})
        encoded = await client.get(f"/demo/v1/query?api%2Dkey={KEYS[1]}&page=3")
    assert seen.json() == {"page": "2"}
    assert encoded.json() == {"page": "3"}  # a name percent-encoded is the same name


async def test_a_service_behind_the_gateway_takes_no_key_instead(tmp_path: Path) -> None:
    """require_principal wins over api_keys: it says the gateway is the only way in."""
    app = demo_app(tmp_path, api_keys=KEYS, require_principal=True)
    async with serving(app) as client:
        with_key = await client.get("/demo/v1/whoami", headers={"X-API-Key": KEYS[0]})
        through_gateway = await client.get(
            "/demo/v1/whoami", headers={"X-C4C-Principal": sign_principal(ALICE, SECRET.encode())}
        )
    assert with_key.status_code == 401
    assert with_key.json()["type"] == "urn:c4c:problem:invalid-principal"
    assert through_gateway.json() == {"kind": "user", "id": "alice"}


def test_a_short_api_key_is_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"at least 16 characters.*openssl rand"):
        DemoSettings(data_dir=tmp_path, api_keys=[KEYS[0], "secret"])


def legacy_shape(exc: ProblemError) -> Response:
    return JSONResponse({"legacy": exc.status_code}, status_code=exc.status_code)


async def test_middleware_refusals_take_the_shape_of_their_prefix(tmp_path: Path) -> None:
    app = demo_app(
        tmp_path, refusal_shapes={"/demo/legacy": legacy_shape}, api_keys=KEYS, max_body_bytes=10
    )
    key = {"X-API-Key": KEYS[0]}
    async with serving(app) as client:
        no_key = await client.get("/demo/legacy/identify")
        too_large = await client.post("/demo/legacy/identify", content=b"x" * 11, headers=key)
        elsewhere = await client.get("/demo/v1/whoami")
    assert (no_key.status_code, no_key.json()) == (401, {"legacy": 401})
    assert (too_large.status_code, too_large.json()) == (413, {"legacy": 413})
    assert elsewhere.headers["content-type"] == "application/problem+json"


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
