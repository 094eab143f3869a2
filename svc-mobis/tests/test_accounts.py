"""Accounts: registration, login (OAuth 2.0 token response, EdDSA tokens verifiable with
the JWKS), refresh rotation and reuse detection, logout, password change, brute force
slowed per account and per address, and deletion refusing the account's tokens."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import httpx
import jwt

from c4c.mobis.settings import MobisSettings

PASSWORD = "correct horse battery"  # the one ``signed_up`` registers with
User = Any


async def login(client: httpx.AsyncClient, email: str, password: str = PASSWORD, **kw: Any) -> Any:
    return await client.post(
        "/mobis/v1/auth/login", json={"email": email, "password": password}, **kw
    )


async def test_login_answers_a_token_response_the_jwks_verifies(
    anonymous: httpx.AsyncClient, signed_up: User, settings: MobisSettings
) -> None:
    user_id, _ = await signed_up("ana@example.org")
    answer = await login(anonymous, "ANA@example.org ")
    assert answer.status_code == 200, answer.text
    tokens = answer.json()
    assert tokens["token_type"] == "Bearer"
    assert tokens["expires_in"] == 900
    assert answer.headers["cache-control"] == "no-store"
    keys = (await anonymous.get("/mobis/v1/.well-known/jwks.json")).json()
    header = jwt.get_unverified_header(tokens["access_token"])
    jwk = next(k for k in keys["keys"] if k["kid"] == header["kid"])
    assert header["alg"] == jwk["alg"] == "EdDSA"
    claims = jwt.decode(
        tokens["access_token"],
        jwt.PyJWK(jwk).key,
        algorithms=["EdDSA"],
        audience="c4c",
        issuer="c4c-mobis",
    )
    assert claims["sub"] == user_id
    assert claims["scope"] == "mobis"
    key_file = Path(settings.data_dir) / "mobis-signing-key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


async def test_register_refuses_weak_passwords_and_taken_emails(
    anonymous: httpx.AsyncClient, signed_up: User
) -> None:
    await signed_up("bo@example.org")
    short = await anonymous.post(
        "/mobis/v1/auth/register", json={"email": "c@example.org", "password": "short"}
    )
    assert short.status_code == 422
    assert short.json()["type"] == "urn:c4c:problem:weak-password"
    again = await anonymous.post(
        "/mobis/v1/auth/register", json={"email": "BO@example.org", "password": PASSWORD}
    )
    assert again.status_code == 409
    bad = await anonymous.post("/mobis/v1/auth/register", json={"email": 5, "password": []})
    assert bad.status_code == 422
    assert bad.headers["content-type"] == "application/problem+json"


async def test_refresh_rotates_and_a_reused_token_revokes_the_family(
    anonymous: httpx.AsyncClient, signed_up: User
) -> None:
    await signed_up("cy@example.org")
    first = (await login(anonymous, "cy@example.org")).json()["refresh_token"]
    rotated = await anonymous.post("/mobis/v1/auth/refresh", json={"refresh_token": first})
    assert rotated.status_code == 200, rotated.text
    second = rotated.json()["refresh_token"]
    assert second != first
    reused = await anonymous.post("/mobis/v1/auth/refresh", json={"refresh_token": first})
    assert reused.status_code == 401
    assert reused.json()["type"] == "urn:c4c:problem:refresh-token-reused"
    # The thief's use ended the whole family: the legitimate newer token is dead too.
    after = await anonymous.post("/mobis/v1/auth/refresh", json={"refresh_token": second})
    assert after.status_code == 401
    garbage = await anonymous.post("/mobis/v1/auth/refresh", json={"refresh_token": "x.y"})
    assert garbage.status_code == 401


async def test_logout_ends_the_session(anonymous: httpx.AsyncClient, signed_up: User) -> None:
    _, me = await signed_up("di@example.org")
    refresh = (await login(anonymous, "di@example.org")).json()["refresh_token"]
    out = await anonymous.post("/mobis/v1/auth/logout", json={"refresh_token": refresh}, headers=me)
    assert out.status_code == 204
    again = await anonymous.post("/mobis/v1/auth/refresh", json={"refresh_token": refresh})
    assert again.status_code == 401


async def test_password_change_ends_every_session(
    anonymous: httpx.AsyncClient, signed_up: User
) -> None:
    _, me = await signed_up("ed@example.org")
    old = (await login(anonymous, "ed@example.org")).json()["refresh_token"]
    wrong = await anonymous.post(
        "/mobis/v1/me/password",
        json={"current_password": "not it at all", "new_password": "a new long password"},
        headers=me,
    )
    assert wrong.status_code == 401
    changed = await anonymous.post(
        "/mobis/v1/me/password",
        json={"current_password": PASSWORD, "new_password": "a new long password"},
        headers=me,
    )
    assert changed.status_code == 200, changed.text
    assert (
        await anonymous.post("/mobis/v1/auth/refresh", json={"refresh_token": old})
    ).status_code == 401
    assert (await login(anonymous, "ed@example.org")).status_code == 401
    assert (await login(anonymous, "ed@example.org", "a new long password")).status_code == 200


async def test_brute_force_is_slowed_per_account_then_per_address(
    anonymous: httpx.AsyncClient, signed_up: User, settings: MobisSettings
) -> None:
    await signed_up("fa@example.org")
    for _ in range(settings.login_free_failures):
        assert (await login(anonymous, "fa@example.org", "guess guess")).status_code == 401
    slowed = await login(anonymous, "fa@example.org", "guess guess")
    assert slowed.status_code in (401, 429)
    blocked = await login(anonymous, "fa@example.org", PASSWORD)  # even the right password
    assert blocked.status_code == 429, blocked.text
    assert int(blocked.headers["retry-after"]) >= 1
    # Another address is slowed too: the account is the target.
    other = await login(
        anonymous, "fa@example.org", PASSWORD, headers={"x-test-address": "203.0.113.9"}
    )
    assert other.status_code == 429
    # One address spraying many accounts is slowed per address.
    sprayer = {"x-test-address": "192.0.2.55"}
    codes = [
        (
            await login(anonymous, f"nobody{i}@example.org", "guess guess", headers=sprayer)
        ).status_code
        for i in range(settings.login_free_failures_per_ip + 1)
    ]
    assert codes[-1] == 429
    assert codes[0] == 401


async def test_a_deleted_account_is_forgotten_and_its_tokens_refused(
    anonymous: httpx.AsyncClient, signed_up: User
) -> None:
    _, me = await signed_up("gu@example.org")
    refresh = (await login(anonymous, "gu@example.org")).json()["refresh_token"]
    wrong = await anonymous.request(
        "DELETE", "/mobis/v1/me", json={"password": "wrong password"}, headers=me
    )
    assert wrong.status_code == 401
    gone = await anonymous.request(
        "DELETE", "/mobis/v1/me", json={"password": PASSWORD}, headers=me
    )
    assert gone.status_code == 204
    assert (await anonymous.get("/mobis/v1/me", headers=me)).status_code == 401
    assert (await anonymous.get("/mobis/v1/me/observations", headers=me)).status_code == 401
    assert (
        await anonymous.post("/mobis/v1/auth/refresh", json={"refresh_token": refresh})
    ).status_code == 401
    assert (await login(anonymous, "gu@example.org")).status_code == 401


async def test_routes_need_an_app_user(anonymous: httpx.AsyncClient) -> None:
    answer = await anonymous.get("/mobis/v1/me/observations")
    assert answer.status_code == 401
    assert answer.json()["type"] == "urn:c4c:problem:unauthenticated"


async def test_app_config_is_versioned_and_cacheable(anonymous: httpx.AsyncClient) -> None:
    latest = await anonymous.get("/mobis/v1/apps/natusfera/config")
    assert latest.status_code == 200
    assert latest.json()["version"] == "2"
    cached = await anonymous.get(
        "/mobis/v1/apps/natusfera/config", headers={"If-None-Match": latest.headers["etag"]}
    )
    assert cached.status_code == 304
    old = await anonymous.get("/mobis/v1/apps/natusfera/config?version=1")
    assert old.json()["version"] == "1"
    assert old.headers["etag"] != latest.headers["etag"]
    assert (await anonymous.get("/mobis/v1/apps/natusfera/config?version=9")).status_code == 404
    assert (await anonymous.get("/mobis/v1/apps/nope/config")).status_code == 404
