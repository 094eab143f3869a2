"""Accounts: registration, login slowed against brute force, access and rotating refresh
tokens with reuse detection, logout, password change and "forget me". No HTTP, no SQL.

Steps that cannot be undone (changing the password, deleting the account) need the current
password; an account without one (made by an OpenID Connect sign-in) needs a fresh sign-in
instead: an access token whose ``auth_time`` is recent and whose session is not ended. A
refresh never makes a sign-in fresher: the family keeps the ``auth_time`` of its login."""

from __future__ import annotations

import hashlib
import ipaddress
import math
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from c4c.mobis.keys import Signer
from c4c.mobis.models import ExpectedMediaRow, OidcIdentityRow, RefreshTokenRow, UserRow
from c4c.mobis.oidc import Identity
from c4c.mobis.repository import Repository, utc
from c4c.mobis.schemas import Account, Register, Tokens
from c4c.mobis.settings import MobisSettings
from c4c.shared.auth import Principal
from c4c.shared.problems import Conflict, ProblemError

DEFAULT_NAME = "MOBIS user"
# Accounts made by an OpenID Connect login have no password: this is no argon2 hash, so no
# password ever matches it.
NO_PASSWORD = "!"  # noqa: S105  (a marker, not a secret)
# Such an account without an email the provider verified gets a unique address that can
# never receive mail (RFC 2606 reserves .invalid).
NO_EMAIL_DOMAIN = "oidc.invalid"
GONE = "This account or session does not exist (any more)."


class Unauthenticated(ProblemError):
    status, code, title = 401, "unauthenticated", "Not signed in"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": 'Bearer realm="mobis"'})


class InvalidCredentials(ProblemError):
    status, code, title = 401, "invalid-credentials", "Wrong email or password"


class InvalidRefreshToken(ProblemError):
    status, code, title = 401, "invalid-refresh-token", "The refresh token is not valid"


class RefreshTokenReused(ProblemError):
    status, code, title = 401, "refresh-token-reused", "The refresh token was already used"


class TooManyAttempts(ProblemError):
    status, code, title = 429, "too-many-login-attempts", "Too many failed logins"

    def __init__(self, retry_after: float) -> None:
        seconds = max(1, math.ceil(retry_after))
        super().__init__(
            f"Try again in {seconds} s.",
            headers={"Retry-After": str(seconds)},
            retry_after=seconds,
        )


def _network(address: str) -> str:
    """What one client controls: an IPv4 address, an IPv6 /64 (a host gets a whole one)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:  # not an address (a test client's name): itself
        return address
    return str(ipaddress.ip_network(f"{ip}/64", strict=False)) if ip.version == 6 else str(ip)


class TooManyRegistrations(TooManyAttempts):
    code, title = "too-many-registrations", "Too many accounts registered from this address"


REGISTRATION_WINDOW = timedelta(hours=1)


class EmailTaken(Conflict):
    code, title = "email-taken", "An account with this email exists"


class WeakPassword(ProblemError):
    status, code, title = 422, "weak-password", "The password is too weak"


class NotAnAppUser(ProblemError):
    status, code, title = 403, "not-an-app-user", "Only app users have an account here"


class ReauthenticationRequired(ProblemError):
    """RFC 9470's step-up challenge: sign in again, then retry with the new access token."""

    status, code, title = 401, "reauthentication-required", "Sign in again first"

    def __init__(self, detail: str, max_age: int) -> None:
        challenge = (
            'Bearer realm="mobis", error="insufficient_user_authentication", '
            f'error_description="A recent sign-in is needed", max_age="{max_age}"'
        )
        super().__init__(detail, headers={"WWW-Authenticate": challenge}, max_age=max_age)


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def has_password(user: UserRow) -> bool:
    return user.password_hash != NO_PASSWORD


class Passwords:
    """argon2id hashing, off the event loop (each hash takes tens of milliseconds)."""

    def __init__(self, settings: MobisSettings) -> None:
        self.hasher = PasswordHasher(
            time_cost=settings.password_hash_time_cost,
            memory_cost=settings.password_hash_memory_kib,
        )
        # Verified when the account does not exist, so that a wrong email costs as long as
        # a wrong password and timing does not tell which accounts exist.
        self.dummy = self.hasher.hash(secrets.token_urlsafe(16))

    async def hash(self, password: str) -> str:
        return await anyio.to_thread.run_sync(self.hasher.hash, password)

    async def matches(self, stored: str, password: str) -> bool:
        def verify() -> bool:
            try:
                return self.hasher.verify(stored, password)
            except (VerificationError, InvalidHashError):
                return False

        return await anyio.to_thread.run_sync(verify)


@dataclass(frozen=True)
class Throttle:
    key: str
    free_failures: int


class Accounts:
    def __init__(
        self,
        repo: Repository,
        signer: Signer,
        passwords: Passwords,
        settings: MobisSettings,
        *,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.repo = repo
        self.signer = signer
        self.passwords = passwords
        self.settings = settings
        self.now = now

    # --- who is calling --------------------------------------------------------------------

    async def user_of(self, principal: Principal | None, access_token: str | None) -> UserRow:
        """The signed-in user: the gateway's principal must name an existing account (a
        deleted account's tokens, still unexpired, are refused here). The access token the
        gateway passes on must belong to a session not ended: logging out and changing the
        password end the stolen access tokens too, not only their refresh tokens."""
        user_id, session = self._caller(principal, access_token)
        if session is None:
            user = await self.repo.user(user_id)
        else:
            user = await self.repo.user_in_session(user_id, session)
        if user is None:
            raise Unauthenticated(GONE)
        return user

    async def user_with_media(
        self, principal: Principal | None, access_token: str | None, media_id: str
    ) -> tuple[str, ExpectedMediaRow | None]:
        """:meth:`user_of`'s id, and the media if of an observation of theirs, in one query (every
        photo uploaded asks both)."""
        user_id, session = self._caller(principal, access_token)
        found = await self.repo.user_with_media(user_id, session, media_id)
        if found is None:
            raise Unauthenticated(GONE)
        return found

    def _caller(
        self, principal: Principal | None, access_token: str | None
    ) -> tuple[str, str | None]:
        """The user the principal names, and the session (refresh-token family) its access
        token belongs to, if the gateway passed the token on."""
        if principal is None or principal.kind == "anonymous":
            raise Unauthenticated("Sign in: send your access token as a bearer token.")
        if principal.kind != "user":
            raise NotAnAppUser("Call MOBIS with an app user's access token.")
        if access_token is None:
            return principal.id, None
        claims = self._claims(principal.id, access_token)
        if claims is None:
            raise Unauthenticated("This access token is not one of this account's.")
        return principal.id, claims["sid"]

    def _claims(self, user_id: str, access_token: str) -> dict[str, Any] | None:
        """The claims of an unexpired access token MOBIS signed for ``user_id``, naming its
        session (``sid``, the refresh-token family); None otherwise."""
        claims = self.signer.claims(access_token)
        if claims is None or claims["sub"] != user_id or not isinstance(claims.get("sid"), str):
            return None
        return claims

    # --- registration and login ------------------------------------------------------------

    def _check_password(self, password: str, email: str) -> None:
        if len(password) < self.settings.password_min_length:
            raise WeakPassword(
                f"Use at least {self.settings.password_min_length} characters.",
                min_length=self.settings.password_min_length,
            )
        if password.strip().lower() == email:
            raise WeakPassword("The password must not be the email address.")

    async def register(self, request: Register, address: str) -> Account:
        self._check_password(request.password, request.email)
        await self._count_registration(address)
        if await self.repo.user_by_email(request.email) is not None:
            raise EmailTaken("Log in, or use another email address.")
        now = self.now()
        user = UserRow(
            id=str(uuid.uuid4()),
            email=request.email,
            password_hash=await self.passwords.hash(request.password),
            display_name=request.displayName or DEFAULT_NAME,
            created_at=now,
            password_changed_at=now,
        )
        if not await self.repo.add_user(user):  # a concurrent registration won
            raise EmailTaken("Log in, or use another email address.")
        return account(user)

    async def _count_registration(self, address: str) -> None:
        """At most ``registrations_per_address`` accounts an hour from one address: each
        costs a password hash, and each has quotas of its own (plantid's identifications).
        Counted in the registration's transaction: a refused one counts nothing."""
        limit = self.settings.registrations_per_address
        if limit == 0:
            return
        now = self.now()
        count, window_end = await self.repo.count_in_window(
            f"register:{_network(address)}", now, REGISTRATION_WINDOW
        )
        if count > limit:
            raise TooManyRegistrations((window_end - now).total_seconds())

    def _throttles(self, email: str, address: str) -> list[Throttle]:
        return [
            Throttle(f"account:{email}", self.settings.login_free_failures),
            Throttle(f"ip:{_network(address)}", self.settings.login_free_failures_per_ip),
        ]

    async def login(
        self, email: str, password: str, address: str, device_id: str | None
    ) -> Tokens | ProblemError:
        """Tokens, or the problem to answer with. Returned, not raised: the failure count
        it recorded must be committed."""
        throttles = self._throttles(email, address)
        now = self.now()
        rows = {row.key: row for row in await self.repo.throttles([t.key for t in throttles])}
        waits = [(utc(r.blocked_until) or now) - now for r in rows.values()]
        longest = max(waits, default=timedelta(0))
        if longest > timedelta(0):
            return TooManyAttempts(longest.total_seconds())
        user = await self.repo.user_by_email(email)
        # An account without a password costs a hash too: timing tells nothing about it.
        valid = await self.passwords.matches(
            user.password_hash if user and has_password(user) else self.passwords.dummy,
            password,
        )
        if user is None or not valid:
            for throttle in throttles:
                excess = await self.repo.add_failure(throttle.key, now) - throttle.free_failures
                if excess >= 0:
                    delay = min(2.0 ** (excess + 1), self.settings.login_max_delay_seconds)
                    await self.repo.block_until(throttle.key, now + timedelta(seconds=delay))
            return InvalidCredentials("Check the email address and the password.")
        for throttle in throttles:
            if throttle.key in rows:
                await self.repo.clear_throttle(throttle.key)
        if self.passwords.hasher.check_needs_rehash(user.password_hash):
            await self.repo.set_password(
                user.id, await self.passwords.hash(password), user.password_changed_at
            )
        return await self._issue(
            user, family_id=str(uuid.uuid4()), device_id=device_id, auth_time=now
        )

    async def sign_in_with(self, identity: Identity, device_id: str | None) -> Tokens:
        """Tokens for someone an OpenID Connect provider vouched for: the user linked to
        their provider account, else the user with the email the provider verified (then
        linked), else a new user without a password."""
        link = await self.repo.oidc_identity(identity.issuer, identity.subject)
        if link is None:
            link = await self._link(identity)
        user = await self.repo.user(link.user_id)
        if user is None:  # deleted with its links, so a race with "forget me"
            raise Unauthenticated("This account does not exist (any more).")
        return await self._issue(
            user,
            family_id=str(uuid.uuid4()),
            device_id=device_id,
            auth_time=min(identity.auth_time, self.now()),
        )

    async def _link(self, identity: Identity) -> OidcIdentityRow:
        """Link a provider account seen for the first time. Two first sign-ins of one
        subject at once both get here: inserts that conflict do nothing, so one link wins,
        and the loser removes the user it made for nothing."""
        now = self.now()
        user = await self.repo.user_by_email(identity.email) if identity.email else None
        made: str | None = None
        if user is None:
            user_id = str(uuid.uuid4())
            new = UserRow(
                id=user_id,
                email=identity.email or f"{user_id}@{NO_EMAIL_DOMAIN}",
                password_hash=NO_PASSWORD,
                display_name=identity.name or DEFAULT_NAME,
                created_at=now,
                password_changed_at=now,
            )
            if await self.repo.add_user(new):
                user, made = new, user_id
            else:  # the verified email was registered meanwhile: that account it is
                user = await self.repo.user_by_email(new.email)
                if user is None:  # and deleted since
                    raise Conflict("The account changed while signing in; try again.")
        link = await self.repo.link_oidc_identity(
            OidcIdentityRow(
                issuer=identity.issuer, subject=identity.subject, user_id=user.id, created_at=now
            )
        )
        if made is not None and link.user_id != made:
            await self.repo.delete_user(made)
        return link

    async def _issue(
        self,
        user: UserRow,
        *,
        family_id: str,
        device_id: str | None,
        auth_time: datetime | None,
        parent_id: str | None = None,
        expires_at: datetime | None = None,
    ) -> Tokens:
        now = self.now()
        token_id = str(uuid.uuid4())
        refresh = f"{token_id}.{secrets.token_urlsafe(32)}"
        expires_at = expires_at or now + timedelta(days=self.settings.refresh_token_days)
        await self.repo.add_refresh_token(
            RefreshTokenRow(
                id=token_id,
                family_id=family_id,
                user_id=user.id,
                device_id=device_id,
                token_hash=_token_hash(refresh),
                issued_at=now,
                expires_at=expires_at,
                parent_id=parent_id,
                auth_time=auth_time,
            )
        )
        access = self.signer.access_token(
            user.id,
            user.display_name,
            self.settings.token_scope,
            session=family_id,
            auth_time=int(auth_time.timestamp()) if auth_time else None,
        )
        return Tokens(
            access_token=access.token,
            expires_in=access.expires_in,
            refresh_token=refresh,
            refresh_expires_in=max(0, int((expires_at - now).total_seconds())),
            scope=self.settings.token_scope,
        )

    async def refresh(self, token: str) -> Tokens | ProblemError:
        """New tokens for a refresh token, which is used up. A token used twice means it
        was stolen (or the app is confused): its whole family is revoked, so neither the
        thief nor the victim can go on without logging in again — except a repeat of the
        latest rotated token within the grace period (see ``_repeated``). Returned, not
        raised: the revocation must be committed."""
        now = self.now()
        row = await self.repo.refresh_token(_token_hash(token))
        if row is None or row.revoked_at is not None:
            return InvalidRefreshToken("Log in again.")
        if row.used_at is not None or not await self.repo.use_refresh_token(row.id, now):
            repeated = await self._repeated(row.token_hash, now)
            if repeated is not None:
                return repeated
            await self.repo.revoke_family(row.family_id, now)
            return RefreshTokenReused("This session is ended for safety; log in again.")
        if (utc(row.expires_at) or now) <= now:
            return InvalidRefreshToken("The session expired; log in again.")
        user = await self.repo.user(row.user_id)
        if user is None:
            return InvalidRefreshToken("Log in again.")
        return await self._issue(
            user,
            family_id=row.family_id,
            device_id=row.device_id,
            auth_time=utc(row.auth_time),
            parent_id=row.id,
        )

    async def _repeated(self, token_hash: str, now: datetime) -> Tokens | None:
        """The grace period: an app whose answer to a refresh was lost sends the same token
        again. If it is the family's latest rotated token (its successor is still unused)
        and was rotated at most ``refresh_grace_seconds`` ago, the successor is superseded
        — presenting it later counts as reuse and ends the family — and a new pair takes
        its place: same session, same sign-in time, same expiry. None otherwise."""
        row = await self.repo.refresh_token(token_hash)  # re-read: a concurrent rotation
        used_at = utc(row.used_at) if row else None
        grace = timedelta(seconds=self.settings.refresh_grace_seconds)
        if row is None or row.revoked_at is not None or used_at is None or now - used_at > grace:
            return None
        successor = await self.repo.live_successor(row.id)
        if successor is None or not await self.repo.use_refresh_token(successor.id, now):
            return None
        user = await self.repo.user(row.user_id)
        if user is None:
            return None
        return await self._issue(
            user,
            family_id=row.family_id,
            device_id=row.device_id,
            auth_time=utc(row.auth_time),
            parent_id=row.id,
            expires_at=utc(successor.expires_at),
        )

    async def prune_refresh_tokens(self, batch: int = 1000) -> bool:
        """Forget refresh tokens that expired a whole lifetime ago (each rotation leaves one
        behind for good); whether a full batch went, so more may be left. Kept that long, a
        token used again soon after it expired still ends its family as a reuse; later it
        is refused as unknown, which ends nothing: an old stolen token no longer says much."""
        lifetime = timedelta(days=self.settings.refresh_token_days)
        return await self.repo.prune_refresh_tokens(self.now() - lifetime, batch) >= batch

    async def logout(self, user: UserRow, token: str | None, everywhere: bool) -> None:
        now = self.now()
        if everywhere:
            await self.repo.revoke_user_tokens(user.id, now)
            return
        if token is None:
            raise InvalidRefreshToken("Send the refresh token of the session to end.")
        row = await self.repo.refresh_token(_token_hash(token))
        if row is None or row.user_id != user.id:
            raise InvalidRefreshToken("This refresh token is not one of your sessions.")
        await self.repo.revoke_family(row.family_id, now)

    async def _confirm(self, user: UserRow, password: str | None, access_token: str | None) -> None:
        """That the caller really is ``user``, before a step that cannot be undone: the
        current password; for an account without one, a fresh sign-in (see the module)."""
        if has_password(user):
            if password is None:
                raise InvalidCredentials("Send the current password.")
            if not await self.passwords.matches(user.password_hash, password):
                raise InvalidCredentials("The current password is wrong.")
            return
        if password is not None:
            raise InvalidCredentials(
                "This account has no password: sign in again with the identity provider, "
                "then retry with the new access token and without a password."
            )
        max_age = self.settings.reauthentication_seconds
        claims = self._claims(user.id, access_token) if access_token else None
        if claims and await self.repo.user_in_session(user.id, claims["sid"]) is None:
            claims = None  # the session ended
        auth_time = claims.get("auth_time") if claims else None
        if not isinstance(auth_time, int) or self.now().timestamp() - auth_time > max_age:
            raise ReauthenticationRequired(
                f"Sign in again with the identity provider (at most {max_age} s before this "
                "request), then retry with the new access token.",
                max_age,
            )

    async def change_password(
        self, user: UserRow, current: str | None, new: str, access_token: str | None
    ) -> Tokens:
        """Set a new password (or a first one, for an account made by an OpenID Connect
        sign-in). Every session ends; the answer is a fresh one for the device that asked."""
        await self._confirm(user, current, access_token)
        self._check_password(new, user.email)
        now = self.now()
        await self.repo.set_password(user.id, await self.passwords.hash(new), now)
        await self.repo.revoke_user_tokens(user.id, now)
        return await self._issue(user, family_id=str(uuid.uuid4()), device_id=None, auth_time=now)

    async def forget(self, user: UserRow, password: str | None, access_token: str | None) -> int:
        """Delete the account and everything personal MOBIS holds; the user's observations
        stay (under their licence) and are handed over to pseudonymisation in ingest.
        Returns how many observations await it."""
        await self._confirm(user, password, access_token)
        pseudonym = f"anonymous-{secrets.token_hex(8)}"
        handed_over = await self.repo.disown(user.id, pseudonym)
        await self.repo.delete_user(user.id)
        return handed_over


def account(user: UserRow) -> Account:
    return Account(
        id=user.id,
        email=user.email,
        displayName=user.display_name,
        createdAt=utc(user.created_at) or user.created_at,
        hasPassword=has_password(user),
    )
