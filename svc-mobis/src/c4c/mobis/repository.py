"""Every query of MOBIS, in the session (transaction) the caller holds."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from c4c.mobis.models import (
    ExpectedMediaRow,
    LoginThrottleRow,
    NotificationRow,
    OidcIdentityRow,
    OidcLoginRow,
    OwnedObservationRow,
    RefreshTokenRow,
    UserRow,
)


def utc(value: datetime | None) -> datetime | None:
    """SQLite hands timestamps back naive; they were stored in UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


class Repository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    # --- accounts ---------------------------------------------------------------------------

    async def user_by_email(self, email: str) -> UserRow | None:
        result = await self.session.execute(select(UserRow).where(UserRow.email == email))
        return result.scalar_one_or_none()

    async def user(self, user_id: str) -> UserRow | None:
        return await self.session.get(UserRow, user_id)

    async def add_user(self, user: UserRow) -> None:
        self.session.add(user)
        await self.session.flush()

    async def set_password(self, user_id: str, password_hash: str, when: datetime) -> None:
        await self.session.execute(
            update(UserRow)
            .where(UserRow.id == user_id)
            .values(password_hash=password_hash, password_changed_at=when)
        )

    async def delete_user(self, user_id: str) -> None:
        await self.session.execute(delete(UserRow).where(UserRow.id == user_id))
        await self.session.execute(
            delete(RefreshTokenRow).where(RefreshTokenRow.user_id == user_id)
        )
        await self.session.execute(
            delete(NotificationRow).where(NotificationRow.user_id == user_id)
        )
        await self.session.execute(
            delete(OidcIdentityRow).where(OidcIdentityRow.user_id == user_id)
        )

    # --- refresh tokens ---------------------------------------------------------------------

    async def add_refresh_token(self, token: RefreshTokenRow) -> None:
        self.session.add(token)
        await self.session.flush()

    async def refresh_token(self, token_hash: str) -> RefreshTokenRow | None:
        result = await self.session.execute(
            select(RefreshTokenRow).where(RefreshTokenRow.token_hash == token_hash)
        )
        return result.scalar_one_or_none()

    async def use_refresh_token(self, token_id: str, when: datetime) -> bool:
        """Mark the token used; False when another request used (or revoked) it first."""
        result = await self.session.execute(
            update(RefreshTokenRow)
            .where(
                RefreshTokenRow.id == token_id,
                RefreshTokenRow.used_at.is_(None),
                RefreshTokenRow.revoked_at.is_(None),
            )
            .values(used_at=when)
        )
        return bool(getattr(result, "rowcount", 0))

    async def revoke_family(self, family_id: str, when: datetime) -> None:
        await self.session.execute(
            update(RefreshTokenRow)
            .where(RefreshTokenRow.family_id == family_id, RefreshTokenRow.revoked_at.is_(None))
            .values(revoked_at=when)
        )

    async def revoke_user_tokens(self, user_id: str, when: datetime) -> None:
        await self.session.execute(
            update(RefreshTokenRow)
            .where(RefreshTokenRow.user_id == user_id, RefreshTokenRow.revoked_at.is_(None))
            .values(revoked_at=when)
        )

    # --- OpenID Connect --------------------------------------------------------------------

    async def add_oidc_login(self, login: OidcLoginRow, now: datetime) -> None:
        """Also sweeps the logins nobody finished."""
        await self.session.execute(delete(OidcLoginRow).where(OidcLoginRow.expires_at <= now))
        self.session.add(login)
        await self.session.flush()

    async def take_oidc_login(self, state_hash: str) -> OidcLoginRow | None:
        """The login with this state, removed: a state works once (of two concurrent
        callbacks, the one whose delete counted wins)."""
        row = await self.session.get(OidcLoginRow, state_hash)
        if row is None:
            return None
        result = await self.session.execute(
            delete(OidcLoginRow).where(OidcLoginRow.state_hash == state_hash)
        )
        return row if getattr(result, "rowcount", 0) else None

    async def oidc_identity(self, issuer: str, subject: str) -> OidcIdentityRow | None:
        return await self.session.get(OidcIdentityRow, (issuer, subject))

    async def add_oidc_identity(self, identity: OidcIdentityRow) -> None:
        self.session.add(identity)
        await self.session.flush()

    # --- login throttling -------------------------------------------------------------------

    async def throttles(self, keys: Sequence[str]) -> list[LoginThrottleRow]:
        result = await self.session.execute(
            select(LoginThrottleRow).where(LoginThrottleRow.key.in_(keys))
        )
        return list(result.scalars())

    async def save_throttle(self, key: str, failures: int, blocked_until: datetime) -> None:
        row = await self.session.get(LoginThrottleRow, key)
        if row is None:
            self.session.add(
                LoginThrottleRow(key=key, failures=failures, blocked_until=blocked_until)
            )
        else:
            row.failures, row.blocked_until = failures, blocked_until
        await self.session.flush()

    async def clear_throttle(self, key: str) -> None:
        await self.session.execute(delete(LoginThrottleRow).where(LoginThrottleRow.key == key))

    # --- owned observations -----------------------------------------------------------------

    async def owned(self, ids: Sequence[str]) -> dict[str, OwnedObservationRow]:
        if not ids:
            return {}
        result = await self.session.execute(
            select(OwnedObservationRow).where(OwnedObservationRow.id.in_(ids))
        )
        return {row.id: row for row in result.scalars()}

    async def owned_one(self, observation_id: str) -> OwnedObservationRow | None:
        result = await self.session.execute(
            select(OwnedObservationRow)
            .where(OwnedObservationRow.id == observation_id)
            .with_for_update()
        )
        return result.scalar_one_or_none()

    async def add_owned(self, rows: Sequence[dict[str, Any]]) -> set[str]:
        """Insert the rows whose id is new; the ids inserted (a concurrent sync of the same
        observation may have inserted the others)."""
        if not rows:
            return set()
        dialect = self.session.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        statement = (
            insert(OwnedObservationRow)
            .on_conflict_do_nothing(index_elements=["id"])
            .returning(OwnedObservationRow.id)
        )
        return set((await self.session.execute(statement, list(rows))).scalars())

    async def update_owned(self, observation_id: str, values: dict[str, Any]) -> None:
        await self.session.execute(
            update(OwnedObservationRow)
            .where(OwnedObservationRow.id == observation_id)
            .values(**values)
        )

    async def page_of(
        self, user_id: str, *, before: int | None, limit: int
    ) -> list[OwnedObservationRow]:
        """The user's observations, newest first, with ``seq`` below ``before``."""
        query = select(OwnedObservationRow).where(OwnedObservationRow.user_id == user_id)
        if before is not None:
            query = query.where(OwnedObservationRow.seq < before)
        query = query.order_by(OwnedObservationRow.seq.desc()).limit(limit)
        return list((await self.session.execute(query)).scalars())

    async def disown(self, user_id: str, pseudonym: str) -> int:
        """Hand the user's observations over to pseudonymisation; how many there were."""
        result = await self.session.execute(
            update(OwnedObservationRow)
            .where(OwnedObservationRow.user_id == user_id)
            .values(user_id=None, pseudonym=pseudonym, summary={})
        )
        return int(getattr(result, "rowcount", 0))

    async def awaiting_pseudonym(self, limit: int) -> list[OwnedObservationRow]:
        result = await self.session.execute(
            select(OwnedObservationRow)
            .where(OwnedObservationRow.user_id.is_(None))
            .order_by(OwnedObservationRow.seq)
            .limit(limit)
        )
        return list(result.scalars())

    async def forget_observation(self, observation_id: str) -> None:
        await self.session.execute(
            delete(ExpectedMediaRow).where(ExpectedMediaRow.observation_id == observation_id)
        )
        await self.session.execute(
            delete(OwnedObservationRow).where(OwnedObservationRow.id == observation_id)
        )

    # --- expected media ---------------------------------------------------------------------

    async def add_media(self, rows: Sequence[dict[str, Any]]) -> None:
        if rows:
            await self.session.execute(insert(ExpectedMediaRow), list(rows))

    async def media_of(self, observation_ids: Sequence[str]) -> dict[str, list[ExpectedMediaRow]]:
        found: dict[str, list[ExpectedMediaRow]] = {i: [] for i in observation_ids}
        if not observation_ids:
            return found
        result = await self.session.execute(
            select(ExpectedMediaRow)
            .where(ExpectedMediaRow.observation_id.in_(observation_ids))
            .order_by(ExpectedMediaRow.id)
        )
        for row in result.scalars():
            found[row.observation_id].append(row)
        return found

    async def media(self, media_ids: Sequence[str]) -> dict[str, ExpectedMediaRow]:
        if not media_ids:
            return {}
        result = await self.session.execute(
            select(ExpectedMediaRow).where(ExpectedMediaRow.id.in_(media_ids))
        )
        return {row.id: row for row in result.scalars()}

    async def media_of_user(self, media_id: str, user_id: str) -> ExpectedMediaRow | None:
        """The media, if it belongs to an observation of this user."""
        result = await self.session.execute(
            select(ExpectedMediaRow)
            .join(OwnedObservationRow, OwnedObservationRow.id == ExpectedMediaRow.observation_id)
            .where(ExpectedMediaRow.id == media_id, OwnedObservationRow.user_id == user_id)
        )
        return result.scalar_one_or_none()

    async def update_media(self, media_id: str, values: dict[str, Any]) -> None:
        await self.session.execute(
            update(ExpectedMediaRow).where(ExpectedMediaRow.id == media_id).values(**values)
        )

    # --- notifications ----------------------------------------------------------------------

    async def add_notification(self, row: NotificationRow) -> None:
        self.session.add(row)
        await self.session.flush()

    async def notifications(self, user_id: str, *, after: int, limit: int) -> list[NotificationRow]:
        result = await self.session.execute(
            select(NotificationRow)
            .where(NotificationRow.user_id == user_id, NotificationRow.seq > after)
            .order_by(NotificationRow.seq)
            .limit(limit)
        )
        return list(result.scalars())

    async def mark_read(self, user_id: str, up_to: int, when: datetime) -> None:
        await self.session.execute(
            update(NotificationRow)
            .where(
                NotificationRow.user_id == user_id,
                NotificationRow.seq <= up_to,
                NotificationRow.read_at.is_(None),
            )
            .values(read_at=when)
        )

    async def unread_count(self, user_id: str) -> int:
        result = await self.session.execute(
            select(func.count())
            .select_from(NotificationRow)
            .where(NotificationRow.user_id == user_id, NotificationRow.read_at.is_(None))
        )
        return int(result.scalar_one())
