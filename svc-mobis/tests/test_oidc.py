"""OpenID Connect login against a tiny provider of our own, served over real HTTP on
loopback (discovery, JWKS, authorize and token endpoints, RS256 ID tokens): the whole
authorization-code flow with PKCE, state and nonce; the native ID-token variant; linking by
subject and by verified email; and refusals — wrong audience, expired, bad signature, wrong
nonce or state, alg=none, HS256 with the public key, provider down."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
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
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from c4c.mobis.models import OidcIdentityRow, UserRow
from c4c.mobis.oidc import Identity, OidcProvider
from c4c.mobis.repository import Repository
from c4c.mobis.service.accounts import Accounts
from c4c.mobis.settings import MobisSettings

CALLBACK = "/mobis/v1/auth/oidc/callback"
JSON = {"Accept": "application/json"}
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
        self.authenticated_at: int | None = None
        """When the person signed in at the provider (its single-sign-on session); None =
        the provider names no auth_time."""
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
            if self.authenticated_at is not None and (
                query.get("prompt") == "login"
                or int(time.time()) - self.authenticated_at > int(query.get("max_age", 1e9))
            ):
                self.authenticated_at = int(time.time())  # the person signs in again
            self.codes[code] = {
                "nonce": query["nonce"],
                "challenge": query["code_challenge"],
                "redirect_uri": query["redirect_uri"],
                "auth_time": self.authenticated_at,
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
                    "id_token": self.id_token(
                        grant["nonce"],
                        **({"auth_time": grant["auth_time"]} if grant["auth_time"] else {}),
                    ),
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


async def sign_in(
    anonymous: httpx.AsyncClient, device: str | None = None, *, reauthenticate: bool = False
) -> httpx.Response:
    """The whole dance: MOBIS sends the user to the provider, the provider (over HTTP)
    sends them back with a code, the callback answers MOBIS' tokens."""
    params = {"deviceId": device} if device else {}
    if reauthenticate:
        params["reauthenticate"] = "true"
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


# --- accounts without a password: a fresh sign-in confirms what cannot be undone ----------


def as_user(tokens: httpx.Response) -> dict[str, str]:
    """Headers of a call through the gateway with these tokens: the principal it derives
    and the bearer token it passes on."""
    return {
        "x-test-user": claims_of(tokens)["sub"],
        "Authorization": f"Bearer {tokens.json()['access_token']}",
    }


async def test_an_account_without_password_deletes_itself_after_a_fresh_sign_in(
    anonymous: httpx.AsyncClient, provider: TinyProvider
) -> None:
    signed_in = await sign_in(anonymous)
    me = as_user(signed_in)
    account = await anonymous.get("/mobis/v1/me", headers=me)
    assert account.json()["hasPassword"] is False
    # Without its access token (only the principal), nothing shows the sign-in is fresh.
    bare = await anonymous.request(
        "DELETE", "/mobis/v1/me", headers={"x-test-user": me["x-test-user"]}
    )
    assert bare.status_code == 401
    assert bare.json()["type"] == "urn:c4c:problem:reauthentication-required"
    challenge = bare.headers["www-authenticate"]
    assert 'error="insufficient_user_authentication"' in challenge
    assert 'max_age="300"' in challenge
    guessed = await anonymous.request("DELETE", "/mobis/v1/me", json={"password": "!"}, headers=me)
    assert guessed.status_code == 401
    assert guessed.json()["type"] == "urn:c4c:problem:invalid-credentials"
    gone = await anonymous.request("DELETE", "/mobis/v1/me", headers=me)
    assert gone.status_code == 204, gone.text
    assert (await anonymous.get("/mobis/v1/me", headers=me)).status_code == 401
    refresh = signed_in.json()["refresh_token"]
    assert (
        await anonymous.post("/mobis/v1/auth/refresh", json={"refresh_token": refresh})
    ).status_code == 401
    # Signing in again makes a new account: the link went with the old one.
    again = await sign_in(anonymous)
    assert claims_of(again)["sub"] != me["x-test-user"]


async def test_an_account_without_password_sets_one_after_a_fresh_sign_in(
    anonymous: httpx.AsyncClient, provider: TinyProvider
) -> None:
    provider.person = {"sub": "u-setter", "email": "set@example.org", "email_verified": True}
    signed_in = await sign_in(anonymous)
    me = as_user(signed_in)
    new_password = {"new_password": "my first own password"}
    set_one = await anonymous.post("/mobis/v1/me/password", json=new_password, headers=me)
    assert set_one.status_code == 200, set_one.text
    # Every session ended, the one answered works; the password logs in now.
    old = signed_in.json()["refresh_token"]
    assert (
        await anonymous.post("/mobis/v1/auth/refresh", json={"refresh_token": old})
    ).status_code == 401
    login = await anonymous.post(
        "/mobis/v1/auth/login",
        json={"email": "set@example.org", "password": new_password["new_password"]},
    )
    assert login.status_code == 200, login.text
    # The old session's access token ended with it; the answered one works.
    assert (await anonymous.get("/mobis/v1/me", headers=me)).status_code == 401
    now_me = await anonymous.get("/mobis/v1/me", headers=as_user(set_one))
    assert now_me.json()["hasPassword"] is True
    # From now on the password is what confirms: a fresh sign-in alone is not enough.
    fresh = as_user(await sign_in(anonymous))
    again = await anonymous.post(
        "/mobis/v1/me/password", json={"new_password": "another password here"}, headers=fresh
    )
    assert again.status_code == 401
    assert again.json()["type"] == "urn:c4c:problem:invalid-credentials"


async def test_a_stale_sign_in_or_a_foreign_or_ended_session_is_refused(
    anonymous: httpx.AsyncClient, provider: TinyProvider, app: FastAPI
) -> None:
    signed_in = await sign_in(anonymous)
    user_id, session = claims_of(signed_in)["sub"], claims_of(signed_in)["sid"]
    signer = app.state.parts.signer

    async def delete_with(access_token: str) -> httpx.Response:
        headers = {"x-test-user": user_id, "Authorization": f"Bearer {access_token}"}
        return await anonymous.request("DELETE", "/mobis/v1/me", headers=headers)

    # What MOBIS signed for a sign-in six minutes ago (a refresh keeps that time).
    stale = signer.access_token(
        user_id, "x", "mobis", session=session, auth_time=int(time.time()) - 360
    ).token
    refused = await delete_with(stale)
    assert refused.status_code == 401
    assert refused.json()["type"] == "urn:c4c:problem:reauthentication-required"
    # Refreshing does not make the sign-in fresher.
    refreshed = await anonymous.post(
        "/mobis/v1/auth/refresh", json={"refresh_token": signed_in.json()["refresh_token"]}
    )
    assert claims_of(refreshed)["auth_time"] == claims_of(signed_in)["auth_time"]
    # Another user's fresh token, sent along with this user's principal.
    provider.person = {"sub": "someone-else"}
    other = (await sign_in(anonymous)).json()["access_token"]
    assert (await delete_with(other)).status_code == 401
    # A token signed by another key, and one without auth_time.
    assert (await delete_with(provider.id_token())).status_code == 401
    undated = signer.access_token(user_id, "x", "mobis", session=session, auth_time=None).token
    refused = await delete_with(undated)
    assert refused.status_code == 401
    assert refused.json()["type"] == "urn:c4c:problem:reauthentication-required"
    # A fresh token of a session that was logged out.
    out = await anonymous.post(
        "/mobis/v1/auth/logout", json={"everywhere": True}, headers={"x-test-user": user_id}
    )
    assert out.status_code == 204
    ended = await delete_with(signed_in.json()["access_token"])
    assert ended.status_code == 401
    assert ended.json()["type"] == "urn:c4c:problem:unauthenticated"
    # None of these deleted the account.
    still = await anonymous.get("/mobis/v1/me", headers={"x-test-user": user_id})
    assert still.status_code == 200


async def test_the_providers_auth_time_decides_and_an_app_may_ask_for_a_new_sign_in(
    anonymous: httpx.AsyncClient, provider: TinyProvider
) -> None:
    """A provider with a single-sign-on session signs in without asking: its auth_time
    says when the person last really authenticated. With reauthenticate=true MOBIS asks
    the provider to make them sign in again."""
    provider.authenticated_at = int(time.time()) - 3600
    signed_in = await sign_in(anonymous)
    assert claims_of(signed_in)["auth_time"] == provider.authenticated_at
    refused = await anonymous.request("DELETE", "/mobis/v1/me", headers=as_user(signed_in))
    assert refused.status_code == 401
    assert refused.json()["type"] == "urn:c4c:problem:reauthentication-required"

    start = await anonymous.get(
        "/mobis/v1/auth/oidc/start", params={"reauthenticate": "true"}, headers=JSON
    )
    asked = parse_qs(urlsplit(start.json()["authorizationUrl"]).query)
    assert asked["prompt"] == ["login"]
    assert asked["max_age"] == ["300"]
    plain = await anonymous.get("/mobis/v1/auth/oidc/start", headers=JSON)
    assert "prompt" not in parse_qs(urlsplit(plain.json()["authorizationUrl"]).query)

    again = await sign_in(anonymous, reauthenticate=True)
    assert claims_of(again)["sub"] == claims_of(signed_in)["sub"]
    gone = await anonymous.request("DELETE", "/mobis/v1/me", headers=as_user(again))
    assert gone.status_code == 204, gone.text

    provider.authenticated_at = int(time.time()) + 3600  # a clock ahead: now, at most
    ahead = await sign_in(anonymous)
    assert claims_of(ahead)["auth_time"] <= time.time() + 1


# --- two first sign-ins of one subject at once ----------------------------------------------


class RacingRepository(Repository):
    """Holds each first sign-in after it found no link, until both have looked: the two
    transactions then both insert, as two replicas could."""

    def __init__(self, session: AsyncSession, barrier: asyncio.Barrier) -> None:
        super().__init__(session)
        self.barrier = barrier

    async def oidc_identity(self, issuer: str, subject: str) -> OidcIdentityRow | None:
        found = await super().oidc_identity(issuer, subject)
        await self.barrier.wait()
        return found


@pytest.mark.parametrize("verified_email", [False, True])
async def test_two_first_sign_ins_of_one_subject_make_one_account(
    app: FastAPI, settings: MobisSettings, verified_email: bool
) -> None:
    parts = app.state.parts
    identity = Identity(
        issuer=settings.oidc_issuer or "",
        subject=f"twin-{verified_email}",
        email="twin@example.org" if verified_email else None,
        name="Twin",
        auth_time=datetime.now(UTC),
    )
    # SQLite runs one transaction at a time (BEGIN IMMEDIATE on one connection): there the
    # two sign-ins start together and the second waits for the first.
    sqlite = parts.runtime.db.engine.dialect.name == "sqlite"
    start, looked = asyncio.Barrier(2), asyncio.Barrier(1 if sqlite else 2)

    async def sign_in_once() -> str:
        await start.wait()
        async with parts.runtime.db.sessions() as session, session.begin():
            accounts = Accounts(
                RacingRepository(session, looked), parts.signer, parts.passwords, settings
            )
            tokens = await accounts.sign_in_with(identity, None)
        subject: str = jwt.decode(tokens.access_token, options={"verify_signature": False})["sub"]
        return subject

    first, second = await asyncio.gather(sign_in_once(), sign_in_once())
    assert first == second
    async with parts.runtime.db.sessions() as session:
        users = (await session.execute(select(func.count()).select_from(UserRow))).scalar_one()
        links = await session.execute(select(OidcIdentityRow.user_id))
    assert users == 1  # the loser's user is gone
    assert [user_id for (user_id,) in links] == [first]


async def test_two_first_sign_ins_through_the_api_at_once(
    anonymous: httpx.AsyncClient, provider: TinyProvider
) -> None:
    token = provider.id_token()
    start = asyncio.Barrier(2)

    async def post() -> httpx.Response:
        await start.wait()
        return await anonymous.post("/mobis/v1/auth/oidc/token", json={"id_token": token})

    answers = await asyncio.gather(post(), post())
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    assert claims_of(answers[0])["sub"] == claims_of(answers[1])["sub"]
