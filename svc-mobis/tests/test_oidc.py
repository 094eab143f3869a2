"""OpenID Connect login against a tiny provider of our own, served over real HTTP on
loopback (discovery, JWKS, authorize and token endpoints, RS256 ID tokens): the whole
authorization-code flow with PKCE, state and nonce; the native ID-token variant; linking by
subject and by verified email; and refusals — wrong audience, expired, bad signature, wrong
nonce or state, alg=none, HS256 with the public key, provider down."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
import jwt
import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI, Form, Header, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import SecretStr, ValidationError

from c4c.mobis.oidc import OidcProvider
from c4c.mobis.settings import MobisSettings

CALLBACK = "/mobis/v1/auth/oidc/callback"
CLIENT_ID = "mobis-app"
CLIENT_SECRET = "s3cret:with/odd chars"
Claims = dict[str, Any]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TinyProvider:
    """An OpenID Connect provider just big enough for the flow. ``person`` is who "signs
    in" at its authorize endpoint; ``overrides`` and ``sign_with`` spoil the ID tokens it
    issues; ``down`` makes every endpoint answer 503."""

    def __init__(self, issuer: str) -> None:
        self.issuer = issuer
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = "key-1"
        self.sign_with = self.key
        self.person: Claims = {"sub": "authenix|1", "name": "Ada Field"}
        self.overrides: Claims = {}
        self.down = False
        self.codes: dict[str, Claims] = {}
        self.redirect_uri = f"http://mobis.test{CALLBACK}"
        self.stop: Callable[[], None] = lambda: None
        """Takes the provider off the network (set by the fixture that serves it)."""
        self.app = self._app()

    def public_pem(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def id_token(self, nonce: str | None = None, **overrides: Any) -> str:
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "aud": CLIENT_ID,
            "iat": now,
            "exp": now + 300,
            **self.person,
            **({"nonce": nonce} if nonce else {}),
            **self.overrides,
            **overrides,
        }
        return jwt.encode(claims, self.sign_with, algorithm="RS256", headers={"kid": self.kid})

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.middleware("http")
        async def maybe_down(request: Request, call_next: Any) -> Response:
            if self.down:
                return JSONResponse({"error": "temporarily_unavailable"}, status_code=503)
            response: Response = await call_next(request)
            return response

        @app.get("/.well-known/openid-configuration")
        async def discovery() -> Claims:
            return {
                "issuer": self.issuer,
                "authorization_endpoint": f"{self.issuer}/authorize",
                "token_endpoint": f"{self.issuer}/token",
                "jwks_uri": f"{self.issuer}/jwks",
                "response_types_supported": ["code"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "token_endpoint_auth_methods_supported": ["client_secret_basic"],
            }

        @app.get("/jwks")
        async def jwks() -> Claims:
            jwk = jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
            return {"keys": [jwk | {"kid": self.kid, "alg": "RS256", "use": "sig"}]}

        @app.get("/authorize")
        async def authorize(request: Request) -> Response:
            query = request.query_params
            assert query["response_type"] == "code"
            assert query["client_id"] == CLIENT_ID
            assert query["redirect_uri"] == self.redirect_uri
            assert query["code_challenge_method"] == "S256"
            assert "openid" in query["scope"].split()
            code = secrets.token_urlsafe(16)
            self.codes[code] = {
                "nonce": query["nonce"],
                "challenge": query["code_challenge"],
                "redirect_uri": query["redirect_uri"],
            }
            return RedirectResponse(
                f"{query['redirect_uri']}?code={code}&state={query['state']}", status_code=302
            )

        @app.post("/token")
        async def token(
            grant_type: str = Form(),
            code: str = Form(),
            redirect_uri: str = Form(),
            code_verifier: str = Form(),
            authorization: str = Header(""),
        ) -> Response:
            scheme, _, encoded = authorization.partition(" ")
            client, _, secret = base64.b64decode(encoded).decode().partition(":")
            if scheme != "Basic" or (unquote(client), unquote(secret)) != (
                CLIENT_ID,
                CLIENT_SECRET,
            ):
                return JSONResponse({"error": "invalid_client"}, status_code=401)
            grant = self.codes.pop(code, None)
            challenge = _b64(hashlib.sha256(code_verifier.encode()).digest())
            if (
                grant_type != "authorization_code"
                or grant is None
                or grant["redirect_uri"] != redirect_uri
                or grant["challenge"] != challenge
            ):
                return JSONResponse({"error": "invalid_grant"}, status_code=400)
            return JSONResponse(
                {
                    "access_token": "provider-access-token",
                    "token_type": "Bearer",
                    "id_token": self.id_token(grant["nonce"]),
                }
            )

        return app


@pytest.fixture
async def provider(eventually: Callable[..., Any]) -> AsyncIterator[TinyProvider]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    tiny = TinyProvider(f"http://127.0.0.1:{listener.getsockname()[1]}")
    server = uvicorn.Server(uvicorn.Config(tiny.app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    await eventually(lambda: server.started)

    def stop() -> None:
        server.should_exit = True
        thread.join(10)

    tiny.stop = stop
    yield tiny
    stop()
    listener.close()


@pytest.fixture
def settings(settings: MobisSettings, provider: TinyProvider) -> MobisSettings:
    return MobisSettings(
        **settings.model_dump(exclude_unset=True),
        oidc_issuer=provider.issuer,
        oidc_client_id=CLIENT_ID,
        oidc_client_secret=SecretStr(CLIENT_SECRET),
        oidc_redirect_uri=provider.redirect_uri,
    )


async def sign_in(anonymous: httpx.AsyncClient, device: str | None = None) -> httpx.Response:
    """The whole dance: MOBIS sends the user to the provider, the provider (over HTTP)
    sends them back with a code, the callback answers MOBIS' tokens."""
    params = {"deviceId": device} if device else {}
    start = await anonymous.get("/mobis/v1/auth/oidc/start", params=params)
    assert start.status_code == 302, start.text
    async with httpx.AsyncClient() as browser:
        back = await browser.get(start.headers["location"])
    assert back.status_code == 302, back.text
    returned = urlsplit(back.headers["location"])
    assert returned.path == CALLBACK
    return await anonymous.get(CALLBACK, params=parse_qs(returned.query))


def claims_of(tokens: httpx.Response) -> Claims:
    claims: Claims = jwt.decode(tokens.json()["access_token"], options={"verify_signature": False})
    return claims


async def test_the_code_flow_signs_in_and_the_session_works_like_any_other(
    anonymous: httpx.AsyncClient, provider: TinyProvider
) -> None:
    start = await anonymous.get("/mobis/v1/auth/oidc/start")
    assert start.status_code == 302
    assert start.headers["cache-control"] == "no-store"
    asked = parse_qs(urlsplit(start.headers["location"]).query)
    assert asked["code_challenge_method"] == ["S256"]
    assert asked["state"] == [start.json()["state"]]
    assert len(asked["nonce"][0]) >= 32

    first = await sign_in(anonymous, device="phone-1")
    assert first.status_code == 200, first.text
    assert first.json()["token_type"] == "Bearer"
    assert first.headers["cache-control"] == "no-store"
    user_id = claims_of(first)["sub"]
    me = await anonymous.get("/mobis/v1/me", headers={"x-test-user": user_id})
    assert me.json()["displayName"] == "Ada Field"
    assert me.json()["email"].endswith("@oidc.invalid")  # the provider verified no email

    again = await sign_in(anonymous)
    assert claims_of(again)["sub"] == user_id  # linked by the provider's subject
    refreshed = await anonymous.post(
        "/mobis/v1/auth/refresh", json={"refresh_token": first.json()["refresh_token"]}
    )
    assert refreshed.status_code == 200, refreshed.text
    assert claims_of(refreshed)["sub"] == user_id
    no_password = await anonymous.post(
        "/mobis/v1/auth/login", json={"email": me.json()["email"], "password": "!" * 12}
    )
    assert no_password.status_code in (401, 422)


async def test_a_state_works_once_and_an_unknown_one_never(
    anonymous: httpx.AsyncClient, provider: TinyProvider
) -> None:
    start = await anonymous.get("/mobis/v1/auth/oidc/start")
    async with httpx.AsyncClient() as browser:
        back = await browser.get(start.headers["location"])
    callback = parse_qs(urlsplit(back.headers["location"]).query)
    forged = await anonymous.get(CALLBACK, params=callback | {"state": "not-the-state"})
    assert forged.status_code == 400
    assert forged.json()["type"] == "urn:c4c:problem:invalid-oidc-state"
    assert (await anonymous.get(CALLBACK, params=callback)).status_code == 200
    replayed = await anonymous.get(CALLBACK, params=callback)
    assert replayed.status_code == 400
    assert replayed.headers["content-type"] == "application/problem+json"


async def test_apps_get_the_url_as_json_and_may_post_the_code_back(
    anonymous: httpx.AsyncClient, provider: TinyProvider
) -> None:
    start = await anonymous.get("/mobis/v1/auth/oidc/start", headers={"Accept": "application/json"})
    assert start.status_code == 200
    assert start.json()["expiresIn"] == 600
    async with httpx.AsyncClient() as browser:
        back = await browser.get(start.json()["authorizationUrl"])
    returned = {k: v[0] for k, v in parse_qs(urlsplit(back.headers["location"]).query).items()}
    posted = await anonymous.post(CALLBACK, data=returned)
    assert posted.status_code == 200, posted.text
    assert "refresh_token" in posted.json()


async def test_the_provider_saying_no_ends_the_login(
    anonymous: httpx.AsyncClient, provider: TinyProvider
) -> None:
    state = (await anonymous.get("/mobis/v1/auth/oidc/start")).json()["state"]
    denied = await anonymous.get(
        CALLBACK,
        params={"state": state, "error": "access_denied", "error_description": "user said no"},
    )
    assert denied.status_code == 401
    assert denied.json()["type"] == "urn:c4c:problem:oidc-login-refused"
    assert "access_denied" in denied.json()["detail"]
    state = (await anonymous.get("/mobis/v1/auth/oidc/start")).json()["state"]
    bad_code = await anonymous.get(CALLBACK, params={"state": state, "code": "made-up"})
    assert bad_code.status_code == 401
    assert "invalid_grant" in bad_code.json()["detail"]


async def test_a_verified_email_links_the_password_account_an_unverified_one_does_not(
    anonymous: httpx.AsyncClient, provider: TinyProvider, signed_up: Any
) -> None:
    owner_id, _ = await signed_up("ana@example.org")
    provider.person = {"sub": "u-unverified", "email": "ANA@example.org", "email_verified": False}
    stranger = await sign_in(anonymous)
    assert stranger.status_code == 200, stranger.text
    assert claims_of(stranger)["sub"] != owner_id
    provider.person = {"sub": "u-verified", "email": "ana@example.org", "email_verified": True}
    owner = await sign_in(anonymous)
    assert claims_of(owner)["sub"] == owner_id
    password_login = await anonymous.post(
        "/mobis/v1/auth/login",
        json={"email": "ana@example.org", "password": "correct horse battery"},
    )
    assert password_login.status_code == 200


@pytest.mark.parametrize(
    ("spoil", "reason"),  # reason: what the problem's detail names
    [
        ({"aud": "another-client"}, "audience"),
        ({"iss": "https://evil.example"}, "issuer"),
        ({"exp": int(time.time()) - 3600, "iat": int(time.time()) - 7200}, "expired"),
        ({"nonce": "not-this-logins-nonce"}, "nonce"),
        ({"aud": [CLIENT_ID, "another-client"]}, "several audiences"),
        (None, "signature verification failed"),
    ],
)
async def test_the_callback_refuses_a_spoilt_id_token(
    anonymous: httpx.AsyncClient, provider: TinyProvider, spoil: Claims | None, reason: str
) -> None:
    if spoil is None:
        provider.sign_with = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        provider.overrides = spoil
    refused = await sign_in(anonymous)
    assert refused.status_code == 401, refused.text
    assert refused.json()["type"] == "urn:c4c:problem:invalid-id-token"
    assert reason in refused.json()["detail"].lower()


def unsigned(claims: Claims) -> str:
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{_b64(json.dumps(claims).encode())}."


def signed_hs256_with(secret: bytes, claims: Claims, kid: str) -> str:
    """The algorithm-confusion forgery: the provider's public key used as an HMAC secret
    (PyJWT will not make one, so it is made by hand)."""
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    body = _b64(json.dumps(claims).encode())
    mac = hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{_b64(mac)}"


async def test_an_app_may_bring_its_own_id_token_verified_the_same_way(
    anonymous: httpx.AsyncClient, provider: TinyProvider
) -> None:
    url = "/mobis/v1/auth/oidc/token"
    good = await anonymous.post(url, json={"id_token": provider.id_token("n-1"), "nonce": "n-1"})
    assert good.status_code == 200, good.text
    claims = jwt.decode(provider.id_token("n-1"), options={"verify_signature": False})
    forgeries = {
        "alg none": unsigned(claims),
        "hs256 with the public key": signed_hs256_with(provider.public_pem(), claims, provider.kid),
        "wrong nonce": provider.id_token("n-2"),
        "unknown key": jwt.encode(
            claims,
            rsa.generate_private_key(public_exponent=65537, key_size=2048),
            algorithm="RS256",
            headers={"kid": "key-2"},
        ),
        "garbage": "not.a.jwt",
    }
    for name, token in forgeries.items():
        answer = await anonymous.post(url, json={"id_token": token, "nonce": "n-1"})
        assert answer.status_code == 401, f"{name}: {answer.text}"
        assert answer.json()["type"] == "urn:c4c:problem:invalid-id-token", name
    huge = await anonymous.post(url, json={"id_token": "x" * 100_000})
    assert huge.status_code in (413, 422)


async def test_a_provider_down_answers_503_never_500(
    anonymous: httpx.AsyncClient, provider: TinyProvider
) -> None:
    provider.down = True
    unreadable = await anonymous.get("/mobis/v1/auth/oidc/start")
    assert unreadable.status_code == 503, unreadable.text
    assert unreadable.json()["type"] == "urn:c4c:problem:oidc-provider-unavailable"
    assert "retry-after" in unreadable.headers

    provider.down = False
    start = await anonymous.get("/mobis/v1/auth/oidc/start")  # metadata cached from here on
    async with httpx.AsyncClient() as browser:
        back = await browser.get(start.headers["location"])
    callback = parse_qs(urlsplit(back.headers["location"]).query)
    provider.stop()
    gone = await anonymous.get(CALLBACK, params=callback)
    assert gone.status_code == 503, gone.text
    assert gone.json()["type"] == "urn:c4c:problem:oidc-provider-unavailable"


async def test_without_configuration_the_routes_answer_404(
    anonymous: httpx.AsyncClient, app: FastAPI, tmp_path: Path
) -> None:
    assert OidcProvider.from_settings(MobisSettings(data_dir=tmp_path)) is None
    with pytest.raises(ValidationError):
        MobisSettings(data_dir=tmp_path, oidc_issuer="https://id.example")
    app.state.parts.oidc = None  # what an unconfigured service holds
    for method, path in [
        ("GET", "/mobis/v1/auth/oidc/start"),
        ("GET", f"{CALLBACK}?state=s&code=c"),
        ("POST", "/mobis/v1/auth/oidc/token"),
    ]:
        answer = await anonymous.request(method, path, json={"id_token": "a.b.c"})
        assert answer.status_code == 404, path
        assert answer.json()["type"] == "urn:c4c:problem:oidc-not-configured"
