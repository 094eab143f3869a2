"""Who may call through the gateway: API keys (hashed, scoped, revocable, with a daily
quota), MOBIS tokens verified against a JWKS served on loopback, public routes, rate limits,
and the signed principal the services receive."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from c4c.gateway.models import ApiKey
from c4c.gateway.settings import GatewaySettings
from c4c.shared.auth import Principal, hash_api_key, sign_principal, verify_principal

KID = "mobis-2026-11"
AUDIENCE = "c4c"


def _private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return _private_key()


def jwks_app(signing_key: rsa.RSAPrivateKey) -> Callable[..., Any]:
    """MOBIS' published keys: one RSA key, by kid, with its algorithm."""
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(signing_key.public_key()))
    body = json.dumps({"keys": [jwk | {"kid": KID, "alg": "RS256", "use": "sig"}]}).encode()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"sub": "user-42", "aud": AUDIENCE, "iat": now, "exp": now + 300, "scope": "echo"}
    return {k: v for k, v in (base | overrides).items() if v is not None}


def token(key: rsa.RSAPrivateKey, **overrides: Any) -> str:
    return jwt.encode(claims(**overrides), key, algorithm="RS256", headers={"kid": KID})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(algorithm: str, secret: bytes = b"") -> str:
    """A token PyJWT would refuse to make: alg=none, or HS256 keyed with public data."""
    header = _b64(json.dumps({"alg": algorithm, "typ": "JWT", "kid": KID}).encode())
    payload = _b64(json.dumps(claims()).encode())
    signing_input = f"{header}.{payload}".encode()
    signature = hmac.new(secret, signing_input, hashlib.sha256).digest() if secret else b""
    return f"{header}.{payload}.{_b64(signature)}"


@pytest.fixture
async def with_jwks(
    open_gateway: Callable[..., Any],
    serve_on_loopback: Callable[[Any], Any],
    signing_key: rsa.RSAPrivateKey,
) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    async with (
        serve_on_loopback(jwks_app(signing_key)) as jwks_url,
        open_gateway(jwks_url=f"{jwks_url}/.well-known/jwks.json", jwt_audience=AUDIENCE) as gw,
    ):
        app, client = gw
        del client.headers["X-API-Key"]  # tokens only
        yield app, client


def principal_received(app: Any, response: httpx.Response) -> Any:
    headers = dict(response.json()["headers"])
    return verify_principal(headers["x-c4c-principal"], app.state.proxy.secret)


# --- bearer tokens --------------------------------------------------------------------------


async def test_a_valid_token_passes_its_user_to_the_service(
    with_jwks: tuple[Any, httpx.AsyncClient], signing_key: rsa.RSAPrivateKey
) -> None:
    app, client = with_jwks
    response = await client.get(
        "/echo/me", headers={"Authorization": f"Bearer {token(signing_key)}"}
    )
    assert response.status_code == 200, response.text
    principal = principal_received(app, response)
    assert (principal.kind, principal.id, principal.scopes) == ("user", "user-42", {"echo"})


def _forged() -> str:
    return token(_private_key())  # the right kid, another key


@pytest.mark.parametrize(
    ("name", "make", "detail"),
    [
        ("forged", lambda key: _forged(), "not valid"),
        ("expired", lambda key: token(key, exp=int(time.time()) - 60), "expired"),
        ("wrong audience", lambda key: token(key, aud="another-api"), "not meant for this API"),
        ("no expiry", lambda key: token(key, exp=None), "not valid"),
        ("alg none", lambda key: unsigned_token("none"), "'none'"),
        (
            "HS256 keyed with the public key",
            lambda key: unsigned_token(
                "HS256",
                key.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                ),
            ),
            "'HS256'",
        ),
        ("garbage", lambda key: "not.a.jwt", "not a JWT"),
    ],
)
async def test_bad_tokens_are_refused_with_401(
    with_jwks: tuple[Any, httpx.AsyncClient],
    signing_key: rsa.RSAPrivateKey,
    assert_problem: Callable[..., Any],
    name: str,
    make: Callable[[rsa.RSAPrivateKey], str],
    detail: str,
) -> None:
    _, client = with_jwks
    response = await client.get(
        "/echo/me", headers={"Authorization": f"Bearer {make(signing_key)}"}
    )
    body = assert_problem(response, 401)
    assert body["type"] == "urn:c4c:problem:unauthorized"
    assert detail in body["detail"], name
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_a_token_without_the_scope_is_refused_with_403(
    with_jwks: tuple[Any, httpx.AsyncClient],
    signing_key: rsa.RSAPrivateKey,
    assert_problem: Callable[..., Any],
) -> None:
    _, client = with_jwks
    bearer = token(signing_key, scope="mobis")
    response = await client.get("/echo/me", headers={"Authorization": f"Bearer {bearer}"})
    assert assert_problem(response, 403)["type"] == "urn:c4c:problem:missing-scope"


async def test_a_bad_token_beside_a_good_key_is_refused_with_401(
    open_gateway: Callable[..., Any],
    serve_on_loopback: Callable[[Any], Any],
    signing_key: rsa.RSAPrivateKey,
    assert_problem: Callable[..., Any],
) -> None:
    async with (
        serve_on_loopback(jwks_app(signing_key)) as jwks_url,
        open_gateway(jwks_url=f"{jwks_url}/.well-known/jwks.json", jwt_audience=AUDIENCE) as gw,
    ):
        app, client = gw  # holding a good key
        bad = await client.get("/echo/me", headers={"Authorization": "Bearer x.y.z"})
        good = await client.get(
            "/echo/me", headers={"Authorization": f"Bearer {token(signing_key)}"}
        )
    assert assert_problem(bad, 401)["type"] == "urn:c4c:problem:unauthorized"
    assert good.status_code == 200, good.text
    assert principal_received(app, good).kind == "api-key"


async def test_tokens_are_refused_without_a_jwks(
    open_gateway: Callable[..., Any],
    signing_key: rsa.RSAPrivateKey,
    assert_problem: Callable[..., Any],
) -> None:
    async with open_gateway() as (_, client):
        response = await client.get(
            "/echo/me",
            headers={"Authorization": f"Bearer {token(signing_key)}", "X-API-Key": ""},
        )
    assert "no JWKS" in assert_problem(response, 401)["detail"]


# --- API keys --------------------------------------------------------------------------------


async def test_a_key_is_stored_hashed_and_passes_its_principal(
    open_gateway: Callable[..., Any],
) -> None:
    async with open_gateway() as (app, client):
        key = client.headers["X-API-Key"]
        response = await client.get("/echo/x")
        async with app.state.runtime.db.sessions() as session:
            rows = list((await session.execute(select(ApiKey))).scalars())
    assert [row.key_hash for row in rows] == [hash_api_key(key)]
    assert key not in json.dumps([vars(row) for row in rows], default=str)
    principal = principal_received(app, response)
    assert (principal.kind, principal.name, principal.scopes) == ("api-key", "test", {"*"})
    assert principal.id == rows[0].id


async def test_a_key_in_the_query_works_and_goes_no_further(
    open_gateway: Callable[..., Any], received_headers: Callable[..., Any]
) -> None:
    async with open_gateway() as (_, client):
        key = client.headers.pop("X-API-Key")
        response = await client.get(f"/echo/identify?images=a.jpg&api-key={key}&lang=fr")
    assert response.status_code == 200, response.text
    assert response.json()["query"] == "images=a.jpg&lang=fr"
    assert "x-api-key" not in received_headers(response)


async def test_a_callers_own_principal_header_is_replaced(
    open_gateway: Callable[..., Any], received_headers: Callable[..., Any]
) -> None:
    admin = Principal("user", "admin", None, frozenset({"*"}))
    forged = sign_principal(admin, b"a guessed secret")
    async with open_gateway() as (app, client):
        response = await client.get("/echo/x", headers={"X-C4C-Principal": forged})
    assert received_headers(response)["x-c4c-principal"] != [forged]
    assert principal_received(app, response).kind == "api-key"


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        ({}, "Send an API key"),
        ({"X-API-Key": "c4c_made-up"}, "unknown or revoked"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "Send an API key"),
    ],
)
async def test_missing_or_unknown_credentials_are_refused_with_401(
    open_gateway: Callable[..., Any],
    assert_problem: Callable[..., Any],
    headers: dict[str, str],
    detail: str,
) -> None:
    async with open_gateway() as (_, client):
        del client.headers["X-API-Key"]
        response = await client.get("/echo/x", headers=headers)
    assert detail in assert_problem(response, 401)["detail"]


async def test_a_revoked_key_is_refused_with_401(
    open_gateway: Callable[..., Any], assert_problem: Callable[..., Any]
) -> None:
    async with open_gateway(api_key_cache_seconds=0) as (app, client):
        assert (await client.get("/echo/x")).status_code == 200
        keys = app.state.proxy.identity.keys
        [record] = await keys.list()
        assert await keys.revoke(record.id)
        response = await client.get("/echo/x")
    assert "revoked" in assert_problem(response, 401)["detail"]


async def test_a_key_without_the_scope_is_refused_with_403(
    open_gateway: Callable[..., Any], assert_problem: Callable[..., Any]
) -> None:
    async with open_gateway() as (app, client):
        _, secret = await app.state.proxy.identity.keys.create("ingest only", ["ingest"])
        response = await client.get("/echo/x", headers={"X-API-Key": secret})
    body = assert_problem(response, 403)
    assert "'echo'" in body["detail"]


@pytest.mark.parametrize("backend", ["memory", "database"])
async def test_an_exhausted_daily_quota_is_a_429_with_rate_limit_headers(
    open_gateway: Callable[..., Any], assert_problem: Callable[..., Any], backend: str
) -> None:
    async with open_gateway(rate_limit_backend=backend) as (app, client):
        _, secret = await app.state.proxy.identity.keys.create("small", ["*"], daily_quota=2)
        client.headers["X-API-Key"] = secret
        answers = [await client.get("/echo/x") for _ in range(3)]
        metrics = (await client.get("/metrics")).text
    assert [a.status_code for a in answers[:2]] == [200, 200]
    assert answers[0].headers["ratelimit"].startswith('"daily";r=1;t=')
    refused = answers[2]
    assert_problem(refused, 429)
    until_midnight = 86400 - int(time.time()) % 86400
    retry_after = int(refused.headers["retry-after"])
    assert until_midnight - 5 <= retry_after <= until_midnight + 1
    assert '"daily";q=2;w=86400' in refused.headers["ratelimit-policy"]
    assert refused.headers["ratelimit"] == f'"daily";r=0;t={retry_after}'
    assert _sample(metrics, "c4c_gateway_rate_limited_total", route="/echo", policy="daily") >= 1


@pytest.mark.parametrize("backend", ["memory", "database"])
async def test_a_burst_over_the_rate_limit_is_a_429(
    open_gateway: Callable[..., Any], assert_problem: Callable[..., Any], backend: str
) -> None:
    settings = {"rate_limit_per_second": 0.5, "rate_limit_burst": 2}
    async with open_gateway(rate_limit_backend=backend, **settings) as (_, client):
        answers = [await client.get("/echo/x") for _ in range(3)]
    assert [a.status_code for a in answers[:2]] == [200, 200]
    assert_problem(answers[2], 429)
    assert answers[2].headers["ratelimit-policy"] == '"burst";q=2;w=4'
    assert answers[2].headers["ratelimit"] == '"burst";r=0;t=4'
    assert answers[2].headers["retry-after"] == "2"


async def test_public_routes_need_no_credentials_and_are_limited_by_address(
    open_gateway: Callable[..., Any],
) -> None:
    async with open_gateway(rate_limit_per_second=0.5, rate_limit_burst=1) as (app, client):
        del client.headers["X-API-Key"]
        first = await client.get("/echo/healthz")
        second = await client.get("/echo/readyz")
        private = await client.get("/echo/things")
    assert first.status_code == 200, first.text
    principal = principal_received(app, first)
    assert (principal.kind, principal.id) == ("anonymous", "127.0.0.1")
    assert second.status_code == 429  # the same address, over its burst
    assert private.status_code == 401


# --- metrics -------------------------------------------------------------------------------


def _sample(text: str, name: str, **labels: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


async def test_metrics_count_requests_upstream_calls_and_refusals(
    open_gateway: Callable[..., Any],
) -> None:
    async with open_gateway() as (_, client):
        before = (await client.get("/metrics")).text
        await client.get("/echo/teapot")
        await client.get("/echo/x", headers={"X-API-Key": "wrong"})
        after = (await client.get("/metrics")).text

    def grew(name: str, **labels: str) -> float:
        return _sample(after, name, **labels) - _sample(before, name, **labels)

    assert grew("c4c_gateway_requests_total", route="/echo", status="418") == 1
    assert grew("c4c_gateway_requests_total", route="/echo", status="401") == 1
    assert grew("c4c_gateway_request_duration_seconds_count", route="/echo") == 2
    assert grew("c4c_gateway_upstream_requests_total", outcome="418") == 1
    assert grew("c4c_gateway_upstream_duration_seconds_count") == 1
    assert grew("c4c_gateway_auth_refused_total", route="/echo", reason="unauthorized") == 1


async def test_refusals_under_plantnets_api_are_in_its_shape(
    open_gateway: Callable[..., Any], echo_url: str, assert_problem: Callable[..., Any]
) -> None:
    # A Pl@ntNet client pointed at the suite reads {statusCode, error, message}, as plantid
    # itself answers; everywhere else a refusal stays a problem document.
    upstreams = {"/v2": [echo_url], "/echo": [echo_url]}
    async with open_gateway(upstreams=upstreams) as (app, client):
        _, narrow = await app.state.proxy.identity.keys.create("echo only", ["echo"])
        del client.headers["X-API-Key"]
        unknown = await client.post("/v2/identify/flora?api-key=c4c_made-up")
        missing = await client.post("/v2/identify/flora")
        forbidden = await client.get("/v2/projects", headers={"X-API-Key": narrow})
        elsewhere = await client.get("/echo/x")
    for response in (unknown, missing):
        assert response.status_code == 401
        assert response.json() == {
            "statusCode": 401,
            "error": "Unauthorized",
            "message": "Invalid API key",
        }
    assert forbidden.status_code == 403
    assert forbidden.json()["statusCode"] == 403
    assert set(forbidden.json()) == {"statusCode", "error", "message"}
    assert_problem(elsewhere, 401)


def test_mobis_tokens_are_checked_against_the_keys_mobis_publishes_by_default() -> None:
    """Distributed mode needs no JWKS setting: MOBIS' upstream says where its keys are."""
    mobis = {"/mobis": ["http://mobis:8005/", "http://mobis-2:8005"]}
    assert (
        GatewaySettings(upstreams=mobis).jwks_url
        == "http://mobis:8005/mobis/v1/.well-known/jwks.json"
    )
    explicit = "https://keys.example.org/jwks.json"
    assert GatewaySettings(upstreams=mobis, jwks_url=explicit).jwks_url == explicit
    assert GatewaySettings(upstreams={"/ingest": ["http://ingest:8001"]}).jwks_url is None
    embedded = GatewaySettings(port=8600)
    assert embedded.jwks_url == "http://127.0.0.1:8600/mobis/v1/.well-known/jwks.json"
