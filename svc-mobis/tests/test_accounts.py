"""Accounts: registration, login (OAuth 2.0 token response, EdDSA tokens verifiable with
the JWKS), refresh rotation and reuse detection, logout, password change, brute force
slowed per account and per address, and deletion refusing the account's tokens."""

from __future__ import annotations

import asyncio
import hashlib
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
from fastapi import FastAPI
from pydantic import SecretStr
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from c4c.mobis.app import create_app
from c4c.mobis.models import RefreshTokenRow
from c4c.mobis.remote import IngestOverHttp
from c4c.mobis.repository import Repository
from c4c.mobis.schemas import Tokens
from c4c.mobis.service.accounts import Accounts
from c4c.mobis.settings import MobisSettings
from c4c.shared.auth import PRINCIPAL_HEADER, Principal, ensure_principal_secret, sign_principal
from c4c.shared.problems import ProblemError

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
    for body in (
        {"email": "nul\x00@example.org", "password": PASSWORD},
        {"email": "bell\x07@example.org", "password": PASSWORD},
        {"email": "ok@exam\x7fple.org", "password": PASSWORD},
        {"email": "dn@example.org", "password": PASSWORD, "displayName": "a\x00b"},
    ):
        control = await anonymous.post("/mobis/v1/auth/register", json=body)
        assert control.status_code == 422, control.text
        assert control.headers["content-type"] == "application/problem+json"
    refused = await anonymous.post(
        "/mobis/v1/auth/login",
        json={"email": "bo@example.org", "password": PASSWORD, "deviceId": "\x00"},
    )
    assert refused.status_code == 422


async def refresh_with(client: httpx.AsyncClient, token: str) -> httpx.Response:
    return await client.post("/mobis/v1/auth/refresh", json={"refresh_token": token})


def claims_of(tokens: httpx.Response) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(
        tokens.json()["access_token"], options={"verify_signature": False}
    )
    return claims


async def test_refresh_rotates_and_an_older_token_revokes_the_family(
    anonymous: httpx.AsyncClient, signed_up: User
) -> None:
    await signed_up("cy@example.org")
    signed_in = await login(anonymous, "cy@example.org")
    first = signed_in.json()["refresh_token"]
    rotated = await refresh_with(anonymous, first)
    assert rotated.status_code == 200, rotated.text
    second = rotated.json()["refresh_token"]
    assert second != first
    # A refresh keeps the session and the time of the sign-in: it is no new sign-in.
    assert claims_of(rotated)["sid"] == claims_of(signed_in)["sid"]
    assert claims_of(rotated)["auth_time"] == claims_of(signed_in)["auth_time"]
    third = (await refresh_with(anonymous, second)).json()["refresh_token"]
    # ``first`` is not the latest rotated token: a reuse, even within the grace period.
    reused = await refresh_with(anonymous, first)
    assert reused.status_code == 401
    assert reused.json()["type"] == "urn:c4c:problem:refresh-token-reused"
    # The thief's use ended the whole family: the legitimate newer token is dead too.
    assert (await refresh_with(anonymous, third)).status_code == 401
    assert (await refresh_with(anonymous, "x.y")).status_code == 401


async def test_a_repeat_within_the_grace_period_answers_a_new_pair(
    anonymous: httpx.AsyncClient, signed_up: User
) -> None:
    await signed_up("cyd@example.org")
    signed_in = await login(anonymous, "cyd@example.org")
    first = signed_in.json()["refresh_token"]
    lost = await refresh_with(anonymous, first)  # the answer that never reached the app
    assert lost.status_code == 200
    repeat = await refresh_with(anonymous, first)
    assert repeat.status_code == 200, repeat.text
    third = repeat.json()["refresh_token"]
    assert third != lost.json()["refresh_token"]
    assert claims_of(repeat)["sid"] == claims_of(signed_in)["sid"]
    assert claims_of(repeat)["auth_time"] == claims_of(signed_in)["auth_time"]
    assert repeat.json()["refresh_expires_in"] <= lost.json()["refresh_expires_in"]
    fourth = await refresh_with(anonymous, third)
    assert fourth.status_code == 200, fourth.text
    # The lost pair was superseded: whoever holds it and shows up ends the session.
    superseded = await refresh_with(anonymous, lost.json()["refresh_token"])
    assert superseded.status_code == 401
    assert superseded.json()["type"] == "urn:c4c:problem:refresh-token-reused"
    assert (await refresh_with(anonymous, fourth.json()["refresh_token"])).status_code == 401


async def test_a_repeat_after_the_grace_period_revokes_the_family(
    anonymous: httpx.AsyncClient, signed_up: User, app: FastAPI, settings: MobisSettings
) -> None:
    await signed_up("cyn@example.org")
    first = (await login(anonymous, "cyn@example.org")).json()["refresh_token"]
    second = (await refresh_with(anonymous, first)).json()["refresh_token"]
    # ``first`` was rotated longer ago than the grace period.
    rotated_at = datetime.now(UTC) - timedelta(seconds=settings.refresh_grace_seconds + 1)
    async with app.state.parts.runtime.db.sessions() as session, session.begin():
        await session.execute(
            update(RefreshTokenRow)
            .where(RefreshTokenRow.id == first.split(".")[0])
            .values(used_at=rotated_at)
        )
    late = await refresh_with(anonymous, first)
    assert late.status_code == 401
    assert late.json()["type"] == "urn:c4c:problem:refresh-token-reused"
    assert (await refresh_with(anonymous, second)).status_code == 401


class RacingRepository(Repository):
    """Holds a refresh after it read its token, until the other has read it too: both
    then try to use it, as two replicas could."""

    def __init__(self, session: AsyncSession, barrier: asyncio.Barrier) -> None:
        super().__init__(session)
        self.barrier: asyncio.Barrier | None = barrier

    async def refresh_token(self, token_hash: str) -> RefreshTokenRow | None:
        found = await super().refresh_token(token_hash)
        if self.barrier is not None:
            barrier, self.barrier = self.barrier, None
            await barrier.wait()
        return found


async def test_two_refreshes_at_once_both_get_a_pair(
    anonymous: httpx.AsyncClient, signed_up: User, app: FastAPI, settings: MobisSettings
) -> None:
    """An app retrying while its first request is still under way."""
    await signed_up("cyr@example.org")
    first = (await login(anonymous, "cyr@example.org")).json()["refresh_token"]
    parts = app.state.parts
    # SQLite runs one transaction at a time (BEGIN IMMEDIATE on one connection): there the
    # two refreshes start together and the second waits for the first.
    sqlite = parts.runtime.db.engine.dialect.name == "sqlite"
    start, looked = asyncio.Barrier(2), asyncio.Barrier(1 if sqlite else 2)

    async def racer() -> Tokens | ProblemError:
        await start.wait()
        async with parts.runtime.db.sessions() as session, session.begin():
            repo = RacingRepository(session, looked)
            return await Accounts(repo, parts.signer, parts.passwords, settings).refresh(first)

    answers = await asyncio.gather(racer(), racer())
    assert all(isinstance(a, Tokens) for a in answers), answers
    tokens = {a.refresh_token for a in answers if isinstance(a, Tokens)}
    assert len(tokens) == 2
    # Exactly one of them is the family's live token; the other was superseded.
    async with parts.runtime.db.sessions() as session:
        rows = await session.execute(
            select(RefreshTokenRow.used_at).where(
                RefreshTokenRow.id.in_([t.split(".")[0] for t in tokens])
            )
        )
        assert sorted(used is None for (used,) in rows) == [False, True]


async def test_without_a_grace_period_every_repeat_is_a_reuse(
    anonymous: httpx.AsyncClient, signed_up: User, app: FastAPI
) -> None:
    app.state.parts.settings.refresh_grace_seconds = 0.0
    await signed_up("cyz@example.org")
    first = (await login(anonymous, "cyz@example.org")).json()["refresh_token"]
    second = (await refresh_with(anonymous, first)).json()["refresh_token"]
    assert (await refresh_with(anonymous, first)).status_code == 401
    assert (await refresh_with(anonymous, second)).status_code == 401


async def test_two_registrations_of_one_email_at_once(
    anonymous: httpx.AsyncClient,
) -> None:
    start = asyncio.Barrier(2)

    async def register() -> int:
        await start.wait()
        answer = await anonymous.post(
            "/mobis/v1/auth/register", json={"email": "twin@example.org", "password": PASSWORD}
        )
        return answer.status_code

    assert sorted(await asyncio.gather(register(), register())) == [201, 409]


def bearer(user_id: str, tokens: httpx.Response) -> dict[str, str]:
    """Headers of a call through the gateway: the principal it derives from the access
    token, and the token itself, which it passes on."""
    return {"x-test-user": user_id, "Authorization": f"Bearer {tokens.json()['access_token']}"}


async def test_logout_ends_the_session_and_its_access_tokens(
    anonymous: httpx.AsyncClient, signed_up: User
) -> None:
    user_id, me = await signed_up("di@example.org")
    phone = await login(anonymous, "di@example.org")
    tablet = await login(anonymous, "di@example.org")
    refresh = phone.json()["refresh_token"]
    rotated = await refresh_with(anonymous, refresh)
    assert (await anonymous.get("/mobis/v1/me", headers=bearer(user_id, phone))).status_code == 200
    out = await anonymous.post("/mobis/v1/auth/logout", json={"refresh_token": refresh}, headers=me)
    assert out.status_code == 204
    # The whole family ends, the token logged out with and the one rotated from it.
    assert (await refresh_with(anonymous, refresh)).status_code == 401
    assert (await refresh_with(anonymous, rotated.json()["refresh_token"])).status_code == 401
    # Its access tokens, still unexpired, end with it; other sessions go on.
    for tokens in (phone, rotated):
        ended = await anonymous.get("/mobis/v1/me", headers=bearer(user_id, tokens))
        assert ended.status_code == 401
        assert ended.json()["type"] == "urn:c4c:problem:unauthenticated"
    assert (await anonymous.get("/mobis/v1/me", headers=bearer(user_id, tablet))).status_code == 200
    # Someone else's session cannot be ended.
    _, other = await signed_up("dj@example.org")
    foreign = await anonymous.post(
        "/mobis/v1/auth/logout",
        json={"refresh_token": tablet.json()["refresh_token"]},
        headers=other,
    )
    assert foreign.status_code == 401
    # A token MOBIS did not sign, or one of another user, is refused with its principal.
    forged = {"x-test-user": user_id, "Authorization": "Bearer not.a.token"}
    assert (await anonymous.get("/mobis/v1/me", headers=forged)).status_code == 401
    foreign_token = bearer(user_id, await login(anonymous, "dj@example.org"))
    assert (await anonymous.get("/mobis/v1/me", headers=foreign_token)).status_code == 401


async def test_password_change_ends_every_session(
    anonymous: httpx.AsyncClient, signed_up: User
) -> None:
    user_id, me = await signed_up("ed@example.org")
    other_device = await login(anonymous, "ed@example.org")
    old = other_device.json()["refresh_token"]
    wrong = await anonymous.post(
        "/mobis/v1/me/password",
        json={"current_password": "not it at all", "new_password": "a new long password"},
        headers=me,
    )
    assert wrong.status_code == 401
    missing = await anonymous.post(
        "/mobis/v1/me/password", json={"new_password": "a new long password"}, headers=me
    )
    assert missing.status_code == 401
    assert missing.json()["type"] == "urn:c4c:problem:invalid-credentials"
    changed = await anonymous.post(
        "/mobis/v1/me/password",
        json={"current_password": PASSWORD, "new_password": "a new long password"},
        headers=me,
    )
    assert changed.status_code == 200, changed.text
    assert (await refresh_with(anonymous, old)).status_code == 401
    stolen = await anonymous.get("/mobis/v1/me", headers=bearer(user_id, other_device))
    assert stolen.status_code == 401
    assert (
        await anonymous.get("/mobis/v1/me", headers=bearer(user_id, changed))
    ).status_code == 200
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
    # A fresh access token is no substitute for the password of an account that has one.
    assert (await anonymous.request("DELETE", "/mobis/v1/me", headers=me)).status_code == 401
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


async def test_the_jwks_is_public_on_a_mobis_that_takes_the_gateway_alone(
    settings: MobisSettings, ingest_client: httpx.AsyncClient
) -> None:
    """The gateway fetches the keys without a principal: a MOBIS requiring one (as deploy/
    sets it) or keys must still give them, or every app token is refused."""
    strict = settings.model_copy(
        update={"require_principal": True, "api_keys": [SecretStr("k" * 32)]}
    )
    app = create_app(strict, ingest=IngestOverHttp(lambda: ingest_client))
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://mobis.test") as bare,
    ):
        keys = await bare.get("/mobis/v1/.well-known/jwks.json")
        config = await bare.get("/mobis/v1/apps/demo/config")
    assert keys.status_code == 200, keys.text
    assert keys.json()["keys"][0]["alg"] == "EdDSA"
    assert config.status_code == 401  # the rest is still the gateway's alone


async def test_registrations_from_one_address_are_limited(
    settings: MobisSettings, ingest_client: httpx.AsyncClient
) -> None:
    """Each account costs a password hash and has quotas of its own: one address (an IPv6
    host: its /64) makes a few an hour, another address is not held back by it."""
    app = create_app(
        settings.model_copy(update={"registrations_per_address": 2}),
        ingest=IngestOverHttp(lambda: ingest_client),
    )
    secret = ensure_principal_secret(settings)

    def sent_from(address: str) -> dict[str, str]:
        return {PRINCIPAL_HEADER: sign_principal(Principal("anonymous", address), secret)}

    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://mobis.test"
        ) as client,
    ):

        async def register(email: str, address: str) -> httpx.Response:
            return await client.post(
                "/mobis/v1/auth/register",
                json={"email": email, "password": PASSWORD},
                headers=sent_from(address),
            )

        first = [await register(f"u{i}@example.org", f"2001:db8:7::{i}") for i in range(2)]
        third = await register("u2@example.org", "2001:db8:7::ffff")  # the same /64
        elsewhere = await register("u3@example.org", "198.51.100.20")
        signed_in = await login(client, "u0@example.org", headers=sent_from("2001:db8:7::1"))
    assert [r.status_code for r in first] == [201, 201]
    assert third.status_code == 429, third.text
    assert third.json()["type"].endswith("too-many-registrations")
    assert 3500 < int(third.headers["retry-after"]) <= 3600
    assert elsewhere.status_code == 201
    assert signed_in.status_code == 200  # the accounts made work


async def test_failed_logins_at_once_are_each_counted(anonymous: httpx.AsyncClient) -> None:
    """Sent together, failures are refused (two first ones inserted the throttle row twice:
    a 500 on PostgreSQL) and each counted (read, then written, they counted as one: guesses
    sent in parallel went unslowed). The fifth failure slows the account."""
    together = await asyncio.gather(
        *(login(anonymous, "nobody@example.org", "wrong password!") for _ in range(3))
    )
    assert [a.status_code for a in together] == [401] * 3, [a.text for a in together]
    after = [await login(anonymous, "nobody@example.org", "wrong password!") for _ in range(2)]
    assert [a.status_code for a in after] == [401] * 2
    slowed = await login(anonymous, "nobody@example.org", "wrong password!")
    assert slowed.status_code == 429, slowed.text


async def test_refresh_tokens_expired_a_lifetime_ago_are_forgotten(
    app: FastAPI, anonymous: httpx.AsyncClient, signed_up: User, settings: MobisSettings
) -> None:
    """Every rotation leaves a token behind for good: once expired a whole lifetime ago it
    is deleted, in batches; one expired lately stays (its reuse still ends its family), and
    the live session goes on. (test_indexes: found by index.)"""
    await signed_up("eve@example.org")
    tokens = [(await login(anonymous, "eve@example.org")).json()["refresh_token"] for _ in range(4)]
    lifetime = timedelta(days=settings.refresh_token_days)
    now = datetime.now(UTC)
    ages = [lifetime + timedelta(minutes=1), lifetime + timedelta(days=3), timedelta(days=1)]
    db = app.state.runtime.db
    async with db.sessions() as session, session.begin():
        for token, age in zip(tokens, ages, strict=False):  # the last one stays live
            await session.execute(
                update(RefreshTokenRow)
                .where(RefreshTokenRow.token_hash == hashlib.sha256(token.encode()).hexdigest())
                .values(expires_at=now - age)
            )
    passes = []
    for _ in range(3):
        async with db.sessions() as session, session.begin():
            passes.append(await app.state.parts.accounts(session).prune_refresh_tokens(1))
    assert passes == [True, True, False]  # a full batch each: more may be left
    async with db.sessions() as session:
        left = set((await session.scalars(select(RefreshTokenRow.token_hash))).all())
    assert left == {hashlib.sha256(t.encode()).hexdigest() for t in tokens[2:]}
    forgotten = await refresh_with(anonymous, tokens[0])
    assert forgotten.json()["type"] == "urn:c4c:problem:invalid-refresh-token"
    assert (await refresh_with(anonymous, tokens[3])).status_code == 200
