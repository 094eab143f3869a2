"""Every query of MOBIS, in the session (transaction) the caller holds."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    Dialect,
    Row,
    Select,
    Table,
    Text,
    and_,
    bindparam,
    case,
    cast,
    delete,
    false,
    func,
    insert,
    select,
    update,
)
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
from c4c.shared.db import delete_some, sqlite_execute

SHOWN = (
    "seq",
    "id",
    "project",
    "version",
    "summary",
    "score",
    "grade",
    "flags",
    "scored_at",
    "suggestions",
    "created_at",
    "updated_at",
)
"""The columns of an owned observation that "my observations" shows (the others cost
decoding for nothing)."""
AS_TEXT = frozenset({"summary", "flags", "suggestions"})
"""The JSON columns of ``SHOWN``, read as text: a page already shown is not decoded again."""

StoredMark = tuple[str, int, datetime]
"""A media stored in ingest: its id, size, and when."""


@dataclass(slots=True)
class EventState:
    """What events change of an owned observation (see ``Observations.apply_events``), as
    the events of a batch leave it."""

    id: str
    user_id: str | None
    version: int
    scored_at: datetime | None
    identified_at: datetime | None


EVENT_STATE = tuple(f.name for f in fields(EventState))


def utc(value: datetime | None) -> datetime | None:
    """SQLite hands timestamps back naive; they were stored in UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _user_is(
    user_id: str | BindParameter[Any], family_id: str | BindParameter[Any] | None
) -> ColumnElement[bool]:
    """The user, in the refresh-token family ``family_id`` not ended, if one is given."""
    if family_id is None:
        return UserRow.id == user_id
    live = select(RefreshTokenRow.id).where(
        RefreshTokenRow.family_id == family_id,
        RefreshTokenRow.user_id == user_id,
        RefreshTokenRow.revoked_at.is_(None),
    )
    return and_(UserRow.id == user_id, live.exists())


MEDIA = tuple(c.key for c in ExpectedMediaRow.__table__.columns)


@lru_cache(maxsize=2)
def _user_with_media(in_session: bool) -> Select[Any]:
    """See :meth:`Repository.user_with_media`; parameters ``user_id``, ``media_id`` and,
    ``in_session``, ``family_id``."""
    theirs = (
        select(OwnedObservationRow.id)
        .where(
            OwnedObservationRow.id == ExpectedMediaRow.observation_id,
            OwnedObservationRow.user_id == UserRow.id,
            OwnedObservationRow.confirmed.is_(True),
        )
        .exists()
    )
    media = ExpectedMediaRow.__table__
    return (
        select(UserRow.id, *(media.c[name] for name in MEDIA))
        .outerjoin(media, and_(media.c.id == bindparam("media_id"), theirs))
        .where(_user_is(bindparam("user_id"), bindparam("family_id") if in_session else None))
    )


@lru_cache(maxsize=8)  # a few statements, per app dialect (tests make many apps)
def _sqlite_query(
    statement: Select[Any], dialect: Dialect
) -> tuple[str, tuple[str, ...], Callable[[Sequence[Any]], tuple[Any, ...]]]:
    """``statement`` for ``sqlite_execute``: its SQL, the names of its parameters in
    order, and what converts a row as the ORM would (a time from SQLite's text)."""
    compiled = statement.compile(dialect=dialect)
    processors = [
        column.type.dialect_impl(dialect).result_processor(dialect, None)
        for column in statement.selected_columns
    ]

    def convert(row: Sequence[Any]) -> tuple[Any, ...]:
        return tuple(v if p is None else p(v) for v, p in zip(row, processors, strict=True))

    return compiled.string, tuple(compiled.positiontup or ()), convert


class Repository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    # --- accounts ---------------------------------------------------------------------------

    async def user_by_email(self, email: str) -> UserRow | None:
        result = await self.session.execute(select(UserRow).where(UserRow.email == email))
        return result.scalar_one_or_none()

    async def user(self, user_id: str) -> UserRow | None:
        return await self.session.get(UserRow, user_id)

    async def user_in_session(self, user_id: str, family_id: str) -> UserRow | None:
        """The user, if the refresh-token family ``family_id`` of theirs is not ended (one
        query: it runs on every authenticated request)."""
        result = await self.session.execute(select(UserRow).where(_user_is(user_id, family_id)))
        return result.scalar_one_or_none()

    async def user_with_media(
        self, user_id: str, family_id: str | None, media_id: str
    ) -> tuple[str, ExpectedMediaRow | None] | None:
        """The user's id (in the session ``family_id`` if given: see :meth:`user_in_session`)
        and the media, if it belongs to an observation of theirs that ingest has (see
        :meth:`media_of_user`), in one query. Every photo uploaded asks it: on SQLite it goes
        straight to the driver (see ``sqlite_execute``), no ORM object loaded but the media's:
        with its unit, 0.7 ms of CPU where the ORM's query took 1.6 (measured)."""
        values = {"user_id": user_id, "family_id": family_id, "media_id": media_id}
        statement = _user_with_media(family_id is not None)
        dialect = self.session.get_bind().dialect
        if dialect.name == "sqlite":
            sql, names, convert = _sqlite_query(statement, dialect)
            connection = await self.session.connection()
            rows = await sqlite_execute(connection, sql, [values[n] for n in names])
            row = convert(rows[0]) if rows else None
        else:
            row = (await self.session.execute(statement, values)).one_or_none()
        if row is None:
            return None
        user, *media = row
        if media[0] is None:  # no such media of theirs
            return user, None
        return user, ExpectedMediaRow(**dict(zip(MEDIA, media, strict=True)))

    def _insert(self) -> Any:
        """The dialect's INSERT, which knows ON CONFLICT."""
        dialect = self.session.get_bind().dialect.name
        return postgresql.insert if dialect == "postgresql" else sqlite.insert

    async def add_user(self, user: UserRow) -> bool:
        """False, and nothing added, when the email is taken (by a concurrent request too)."""
        values = {c.key: getattr(user, c.key) for c in UserRow.__table__.columns}
        statement = (
            self._insert()(UserRow).values(values).on_conflict_do_nothing().returning(UserRow.id)
        )
        return (await self.session.execute(statement)).first() is not None

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
            select(RefreshTokenRow)
            .where(RefreshTokenRow.token_hash == token_hash)
            .execution_options(populate_existing=True)  # re-read after a concurrent change
        )
        return result.scalar_one_or_none()

    async def live_successor(self, token_id: str) -> RefreshTokenRow | None:
        """The unused, unrevoked token rotated from ``token_id``, if any."""
        result = await self.session.execute(
            select(RefreshTokenRow).where(
                RefreshTokenRow.parent_id == token_id,
                RefreshTokenRow.used_at.is_(None),
                RefreshTokenRow.revoked_at.is_(None),
            )
        )
        return result.scalars().first()

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

    async def prune_refresh_tokens(self, expired_before: datetime, limit: int) -> int:
        """Delete up to ``limit`` refresh tokens that expired before ``expired_before``; how
        many went."""
        table = RefreshTokenRow.__table__
        assert isinstance(table, Table)
        dialect = self.session.get_bind().dialect.name
        expired = delete_some(table, table.c.expires_at < expired_before, limit, dialect)
        return int(getattr(await self.session.execute(expired), "rowcount", 0))

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

    async def link_oidc_identity(self, identity: OidcIdentityRow) -> OidcIdentityRow:
        """The link of the provider account: ``identity`` unless a concurrent first sign-in
        of the same subject linked it first."""
        values = {c.key: getattr(identity, c.key) for c in OidcIdentityRow.__table__.columns}
        await self.session.execute(
            self._insert()(OidcIdentityRow).values(values).on_conflict_do_nothing()
        )
        result = await self.session.execute(
            select(OidcIdentityRow)
            .where(
                OidcIdentityRow.issuer == identity.issuer,
                OidcIdentityRow.subject == identity.subject,
            )
            .execution_options(populate_existing=True)
        )
        return result.scalar_one()

    # --- login throttling -------------------------------------------------------------------

    async def throttles(self, keys: Sequence[str]) -> list[LoginThrottleRow]:
        result = await self.session.execute(
            select(LoginThrottleRow).where(LoginThrottleRow.key.in_(keys))
        )
        return list(result.scalars())

    async def add_failure(self, key: str, now: datetime) -> int:
        """One more failed login under ``key``: the count, in one statement, so failures
        sent at once are each counted (read, then written, they counted as one)."""
        row = LoginThrottleRow
        result = await self.session.execute(
            self._insert()(row)
            .values(key=key, failures=1, blocked_until=now)
            .on_conflict_do_update(index_elements=["key"], set_={"failures": row.failures + 1})
            .returning(row.failures)
        )
        failures: int = result.scalar_one()
        return failures

    async def block_until(self, key: str, until: datetime) -> None:
        """Blocks ``key`` until ``until``, or later where a concurrent failure already did."""
        row = LoginThrottleRow
        await self.session.execute(
            update(row)
            .where(row.key == key)
            .values(blocked_until=case((row.blocked_until < until, until), else_=row.blocked_until))
        )

    async def count_in_window(
        self, key: str, now: datetime, window: timedelta
    ) -> tuple[int, datetime]:
        """One more under ``key`` in its window (a new window of ``window`` once the last
        ended): the count and the window's end, in one statement, concurrent calls too."""
        row = LoginThrottleRow
        ended = row.blocked_until <= now
        result = await self.session.execute(
            self._insert()(row)
            .values(key=key, failures=1, blocked_until=now + window)
            .on_conflict_do_update(
                index_elements=["key"],
                set_={
                    "failures": case((ended, 1), else_=row.failures + 1),
                    "blocked_until": case((ended, now + window), else_=row.blocked_until),
                },
            )
            .returning(row.failures, row.blocked_until)
        )
        count, window_end = result.one()
        return count, window_end.replace(tzinfo=window_end.tzinfo or UTC)  # SQLite: naive

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

    async def event_states(self, ids: Sequence[str]) -> dict[str, EventState]:
        """What events change of these observations, as plain values, locked until the
        transaction ends."""
        if not ids:
            return {}
        table = OwnedObservationRow.__table__
        result = await self.session.execute(
            select(*(table.c[name] for name in EVENT_STATE))
            .where(table.c.id.in_(ids))
            .with_for_update()
        )
        return {row.id: EventState(*row) for row in result}

    async def update_owned_many(self, changes: Mapping[str, Mapping[str, Any]]) -> None:
        """Each observation's new values (by id): one UPDATE by primary key per set of
        columns changed, run for every observation that changed those."""
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for observation_id, values in changes.items():
            groups.setdefault(tuple(sorted(values)), []).append(
                {"b_id": observation_id} | {f"b_{k}": v for k, v in values.items()}
            )
        connection = await self.session.connection()
        for columns, params in groups.items():
            statement = (
                update(OwnedObservationRow)
                .where(OwnedObservationRow.id == bindparam("b_id"))
                .values({c: bindparam(f"b_{c}") for c in columns})
            )
            await connection.execute(statement, params)

    async def owned_locked(self, ids: Sequence[str]) -> dict[str, OwnedObservationRow]:
        """The rows, locked until the transaction ends (events change them)."""
        if not ids:
            return {}
        result = await self.session.execute(
            select(OwnedObservationRow).where(OwnedObservationRow.id.in_(ids)).with_for_update()
        )
        return {row.id: row for row in result.scalars()}

    async def add_owned(self, rows: Sequence[dict[str, Any]]) -> set[str]:
        """Insert the rows whose id is new; the ids inserted (a concurrent sync of the same
        observation may have inserted the others)."""
        return await self._insert_new(OwnedObservationRow, rows)

    async def confirm_owned(self, ids: Sequence[str]) -> int:
        """Confirm the reservations among ``ids``; how many there were."""
        if not ids:
            return 0
        result = await self.session.execute(
            update(OwnedObservationRow)
            .where(OwnedObservationRow.id.in_(ids), OwnedObservationRow.confirmed.is_(False))
            .values(confirmed=True)
        )
        return int(getattr(result, "rowcount", 0))

    async def drop_reserved(
        self, ids: Sequence[str], *, untouched_since: datetime | None = None
    ) -> int:
        """Forget the reservations among ``ids`` (not confirmed, and if ``untouched_since``
        is given, not reserved again since), with their announced media; how many. The rows
        go first, so the media of a row a sync confirms or reserves again meanwhile stay."""
        if not ids:
            return 0
        condition: list[ColumnElement[bool]] = [
            OwnedObservationRow.id.in_(ids),
            OwnedObservationRow.confirmed.is_(False),
        ]
        if untouched_since is not None:
            condition.append(OwnedObservationRow.updated_at < untouched_since)
        result = await self.session.execute(
            delete(OwnedObservationRow).where(*condition).returning(OwnedObservationRow.id)
        )
        dropped = list(result.scalars())
        if dropped:
            await self.session.execute(
                delete(ExpectedMediaRow).where(ExpectedMediaRow.observation_id.in_(dropped))
            )
        return len(dropped)

    async def stale_reservations(self, before: datetime, limit: int) -> list[str]:
        """Users' reservations not touched since ``before``, oldest first (the partial index
        ``ix_owned_unconfirmed`` holds just the unconfirmed rows)."""
        result = await self.session.execute(
            select(OwnedObservationRow.id)
            .where(
                OwnedObservationRow.confirmed == false(),
                OwnedObservationRow.updated_at < before,
                OwnedObservationRow.user_id.is_not(None),
            )
            .order_by(OwnedObservationRow.updated_at)
            .limit(limit)
        )
        return list(result.scalars())

    async def touch_reservations(self, ids: Sequence[str], *, untouched_since: datetime) -> None:
        """Mark the reservations among ``ids`` (still not confirmed nor touched since
        ``untouched_since``) as looked at now."""
        if ids:
            await self.session.execute(
                update(OwnedObservationRow)
                .where(
                    OwnedObservationRow.id.in_(ids),
                    OwnedObservationRow.confirmed.is_(False),
                    OwnedObservationRow.updated_at < untouched_since,
                )
                .values(updated_at=datetime.now(UTC))
            )

    async def update_owned(self, observation_id: str, values: dict[str, Any]) -> None:
        await self.session.execute(
            update(OwnedObservationRow)
            .where(OwnedObservationRow.id == observation_id)
            .values(**values)
        )

    async def page_of(
        self, user_id: str, *, before: int | None, limit: int, only: str | None = None
    ) -> list[Row[Any]]:
        """The user's observations, newest first, with ``seq`` below ``before`` (or just
        ``only``), as plain rows (tuples, hashable, named): apps poll their list, and ORM
        objects, even mappings, cost most of a page. The JSON columns (``AS_TEXT``) come as
        their text, decoded only where needed."""
        table = OwnedObservationRow.__table__
        columns = [
            cast(table.c[name], Text).label(name) if name in AS_TEXT else table.c[name]
            for name in SHOWN
        ]
        query = select(*columns).where(table.c.user_id == user_id, table.c.confirmed.is_(True))
        if before is not None:
            query = query.where(table.c.seq < before)
        if only is not None:
            query = query.where(table.c.id == only)
        query = query.order_by(table.c.seq.desc()).limit(limit)
        return list((await self.session.execute(query)).all())

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
            .where(
                OwnedObservationRow.user_id.is_(None), OwnedObservationRow.pseudonym.is_not(None)
            )
            .order_by(OwnedObservationRow.seq)
            .limit(limit)
        )
        return list(result.scalars())

    async def forget_observation(self, observation_id: str) -> None:
        """Keep of a pseudonymised observation only that its id is nobody's to claim: ingest
        still has it, and a sync of that id and body by anyone would otherwise be taken for
        its creator's retry (MOBIS creates every user's observations as one client)."""
        await self.session.execute(
            delete(ExpectedMediaRow).where(ExpectedMediaRow.observation_id == observation_id)
        )
        await self.session.execute(
            update(OwnedObservationRow)
            .where(OwnedObservationRow.id == observation_id)
            .values(pseudonym=None, body_hash="", summary={})
        )

    # --- expected media ---------------------------------------------------------------------

    async def add_media(self, rows: Sequence[dict[str, Any]]) -> set[str]:
        """Insert the media whose id is new; the ids inserted (a concurrent sync may have
        announced the others for another observation)."""
        return await self._insert_new(ExpectedMediaRow, rows)

    async def _insert_new(
        self, table: type[OwnedObservationRow | ExpectedMediaRow], rows: Sequence[dict[str, Any]]
    ) -> set[str]:
        """Insert the rows whose ``id`` is new, in one statement; the ids inserted."""
        if not rows:
            return set()
        statement = (
            self._insert()(table).on_conflict_do_nothing(index_elements=["id"]).returning(table.id)
        )
        return set((await self.session.execute(statement, list(rows))).scalars())

    async def media_of(self, observation_ids: Sequence[str]) -> dict[str, list[Row[Any]]]:
        """The media announced for each observation, as plain rows (read only: pages of "my
        observations" show them; see :meth:`page_of`)."""
        found: dict[str, list[Row[Any]]] = {i: [] for i in observation_ids}
        if not observation_ids:
            return found
        table = ExpectedMediaRow.__table__
        result = await self.session.execute(
            select(table).where(table.c.observation_id.in_(observation_ids)).order_by(table.c.id)
        )
        for row in result.all():
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
        """The media, if it belongs to an observation of this user that ingest has."""
        result = await self.session.execute(
            select(ExpectedMediaRow)
            .join(OwnedObservationRow, OwnedObservationRow.id == ExpectedMediaRow.observation_id)
            .where(
                ExpectedMediaRow.id == media_id,
                OwnedObservationRow.user_id == user_id,
                OwnedObservationRow.confirmed.is_(True),
            )
        )
        return result.scalar_one_or_none()

    async def update_media(self, media_id: str, values: dict[str, Any]) -> None:
        await self.session.execute(
            update(ExpectedMediaRow).where(ExpectedMediaRow.id == media_id).values(**values)
        )

    async def mark_media_stored(self, marks: Sequence[StoredMark]) -> None:
        """Each media received whole and stored: one UPDATE by primary key, run for all. A
        media gone meanwhile (its observation deleted during the upload) is passed over: a
        Core statement, as the ORM's bulk UPDATE would fail every mark of the batch for it."""
        if marks:
            statement = (
                update(ExpectedMediaRow)
                .where(ExpectedMediaRow.id == bindparam("b_id"))
                .values(received=bindparam("b_received"), stored_at=bindparam("b_stored_at"))
            )
            connection = await self.session.connection()
            await connection.execute(
                statement,
                [{"b_id": i, "b_received": size, "b_stored_at": w} for i, size, w in marks],
            )

    # --- notifications ----------------------------------------------------------------------

    async def add_notifications(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Notifications, given as their columns' values, in one statement."""
        if rows:
            connection = await self.session.connection()
            await connection.execute(insert(NotificationRow), list(rows))

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
