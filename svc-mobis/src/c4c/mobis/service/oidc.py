"""OpenID Connect login: the authorization-code flow with PKCE, state and nonce, and the
native variant where the app brings an ID token it got itself. Who signed in becomes a
MOBIS user (see ``Accounts.sign_in_with``) answered with MOBIS' own tokens. No HTTP, no SQL.

A started login is kept in the database (its state hashed) so that any replica can finish
it, once. The provider is called between two short transactions, never inside one: a slow
provider must not hold a database lock."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime, timedelta

from c4c.mobis.models import OidcLoginRow
from c4c.mobis.oidc import OidcProvider, OidcRefused
from c4c.mobis.repository import Repository, utc
from c4c.mobis.schemas import OidcStart, Tokens
from c4c.mobis.service.accounts import Accounts
from c4c.mobis.settings import MobisSettings
from c4c.shared.problems import ProblemError

Unit = Callable[[], AbstractAsyncContextManager[Repository]]


class InvalidOidcState(ProblemError):
    status, code, title = 400, "invalid-oidc-state", "This login is unknown or over"


def _state_hash(state: str) -> str:
    return hashlib.sha256(state.encode()).hexdigest()


class OidcLogins:
    def __init__(
        self,
        provider: OidcProvider,
        unit: Unit,
        accounts: Callable[[Repository], Accounts],
        settings: MobisSettings,
        *,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.provider = provider
        self.unit = unit
        self.accounts = accounts
        self.lifetime = timedelta(seconds=settings.oidc_login_seconds)
        self.reauthentication_seconds = settings.reauthentication_seconds
        self.now = now

    async def start(self, device_id: str | None, reauthenticate: bool = False) -> OidcStart:
        """``reauthenticate``: the person must really sign in again at the provider, for
        a step that needs a fresh sign-in (an account without password deleting itself)."""
        metadata = await self.provider.metadata()
        state, nonce = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        verifier = secrets.token_urlsafe(64)  # 86 characters: RFC 7636 asks for 43 to 128
        now = self.now()
        async with self.unit() as repo:
            await repo.add_oidc_login(
                OidcLoginRow(
                    state_hash=_state_hash(state),
                    nonce=nonce,
                    code_verifier=verifier,
                    device_id=device_id,
                    expires_at=now + self.lifetime,
                ),
                now,
            )
        return OidcStart(
            authorizationUrl=self.provider.authorization_url(
                metadata,
                state,
                nonce,
                verifier,
                self.reauthentication_seconds if reauthenticate else None,
            ),
            state=state,
            expiresIn=int(self.lifetime.total_seconds()),
        )

    async def finish(
        self, state: str, code: str | None, error: str | None, error_description: str | None
    ) -> Tokens:
        """The callback: the provider's answer for the login ``state`` names. The login is
        used up whatever the outcome, so a code or state seen by a third party is worthless."""
        async with self.unit() as repo:
            login = await repo.take_oidc_login(_state_hash(state))
        if login is None or (utc(login.expires_at) or self.now()) <= self.now():
            raise InvalidOidcState("Start the login again.")
        if error is not None:
            said = f"{error}: {error_description}" if error_description else error
            raise OidcRefused(f"The provider answered {said[:300]!r}.")
        if code is None:
            raise OidcRefused("The provider sent no authorization code.")
        id_token = await self.provider.exchange(code, login.code_verifier)
        identity = await self.provider.verify(id_token, login.nonce)
        async with self.unit() as repo:
            return await self.accounts(repo).sign_in_with(identity, login.device_id)

    async def with_id_token(
        self, id_token: str, nonce: str | None, device_id: str | None
    ) -> Tokens:
        identity = await self.provider.verify(id_token, nonce)
        async with self.unit() as repo:
            return await self.accounts(repo).sign_in_with(identity, device_id)
