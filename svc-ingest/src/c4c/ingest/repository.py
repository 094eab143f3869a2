"""Every query of the ingest service."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache, lru_cache
from operator import itemgetter
from typing import Any

import orjson
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ColumnElement,
    DateTime,
    Float,
    Integer,
    bindparam,
    func,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from c4c.ingest.models import IdentificationRow, MediaRow, ObservationRow
from c4c.ingest.schemas import ObservationFilter
from c4c.shared.db import sqlite_execute, sqlite_values

IN_CHUNK = 500  # ids per IN (...) list: well under every driver's parameter limit
Row = dict[str, Any]  # column values by name


def utc(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; everything stored is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


@dataclass(frozen=True)
class MediaOwner:
    """The observation a media file is for: what the upload needs of it."""

    id: str
    deleted_at: datetime | None
    location_obscured: bool
    version: int


@dataclass(frozen=True)
class MediaFile:
    """What serving a media file needs of its row."""

    media_type: str
    public_key: str | None
    public_sha256: str | None
    external_url: str | None


@dataclass(frozen=True)
class Known:
    """What is stored under a client's id or key: enough to tell a retry from a conflict."""

    id: str
    body_hash: str
    deleted: bool
    created_by: str


@dataclass(frozen=True)
class WriteBackState:
    """An observation as the write-backs from other services see it."""

    dataset_id: str
    quality_assessed_at: datetime | None
    best_identification_at: datetime | None


def _sql_type(column: ColumnElement[Any]) -> str:
    """The PostgreSQL type a column's values travel as. Strings go as text (an explicit cast
    to varchar(n) would truncate silently; the INSERT's own cast refuses instead)."""
    for kind, name in (
        (Boolean, "bool"),
        (BigInteger, "int8"),
        (Integer, "int4"),
        (Float, "float8"),
        (DateTime, "timestamptz"),
        (JSON, "json"),
    ):
        if isinstance(column.type, kind):
            return name
    return "text"


# INSERT ... ON CONFLICT DO NOTHING: a row whose id or key is taken is skipped in one
# statement (no look-up first, no savepoint), whatever the number of rows.
@cache
def _insert_new_postgres(names: tuple[str, ...]) -> str:
    """PostgreSQL's, for rows with the columns ``names``: the rows travel as one JSON array,
    encoded in one call in Rust (as one asyncpg array per column they cost 12 µs more of
    Python per row, measured; the server's parsing costs less than that). Its text does not
    change with the number of rows, so asyncpg prepares it once per connection."""
    columns = ObservationRow.__table__.c
    record = ", ".join(f"{n} {_sql_type(columns[n])}" for n in names)
    return (
        f"INSERT INTO {ObservationRow.__tablename__} ({', '.join(names)})"  # noqa: S608 - names from the table
        f" SELECT {', '.join(names)} FROM json_to_recordset($1::text::json) AS r({record})"
        " ON CONFLICT DO NOTHING RETURNING id"
    )


SQLITE_ROWS_PER_INSERT = 256  # x the columns: under SQLite's 32,766 parameters a statement


@lru_cache(maxsize=32)
def _insert_rows_sqlite(names: tuple[str, ...], count: int) -> str:
    """SQLite's INSERT of ``count`` rows with the columns ``names`` as one VALUES list (as
    SQLAlchemy sends an executemany with RETURNING), for the driver straight: its text
    depends on the count, so the few counts in use are kept (SQLite's statement cache keeps
    their compiled form)."""
    row = f"({', '.join('?' * len(names))})"
    return (
        f"INSERT INTO {ObservationRow.__tablename__} ({', '.join(names)})"  # noqa: S608 - names from the table
        f" VALUES {', '.join([row] * count)} ON CONFLICT DO NOTHING RETURNING id"
    )


_INSERT_MEDIA = {
    "postgresql": postgresql.insert(MediaRow).on_conflict_do_nothing().returning(MediaRow.id),
    "sqlite": sqlite.insert(MediaRow).on_conflict_do_nothing().returning(MediaRow.id),
}

_UPDATE_BY_ID = update(ObservationRow).where(ObservationRow.id == bindparam("observation_id"))

# Media statements, built once (each keeps its cache key, not worked out per call). An upload
# and a media GET read the few columns they use: the ORM's load of a whole row was about 40%
# of recording a media row's CPU.
_MEDIA_OWNER = select(
    ObservationRow.id,
    ObservationRow.deleted_at,
    ObservationRow.location_obscured,
    ObservationRow.version,
).where(ObservationRow.id == bindparam("observation_id"))
_MEDIA_OWNER_FOR_UPDATE = _MEDIA_OWNER.with_for_update()
_MEDIA_FILE = select(
    MediaRow.media_type, MediaRow.public_key, MediaRow.public_sha256, MediaRow.external_url
).where(MediaRow.id == bindparam("media_id"))
_COUNT_MEDIA = _UPDATE_BY_ID.values(media_count=ObservationRow.media_count + 1)
_COUNT_MEDIA_BUMPED = _COUNT_MEDIA.values(
    updated_at=bindparam("new_updated_at"), version=bindparam("new_version")
)

SORT_COLUMNS = {
    "created": ObservationRow.created_at,
    "eventDate": ObservationRow.event_start,
    "updated": ObservationRow.updated_at,
}


class Repository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    # --- observations ----------------------------------------------------------------------

    async def get(self, observation_id: str, *, for_update: bool = False) -> ObservationRow | None:
        query = select(ObservationRow).where(ObservationRow.id == observation_id)
        if for_update:
            query = query.with_for_update()
        return (await self.session.execute(query)).scalar_one_or_none()

    async def known(
        self, *, ids: Iterable[str] = (), idempotency_key: str | None = None
    ) -> dict[str, Known]:
        """Stored observations by id, and the one under ``idempotency_key`` (keyed ``key:``)."""
        columns = (
            ObservationRow.id,
            ObservationRow.body_hash,
            ObservationRow.deleted_at,
            ObservationRow.created_by,
            ObservationRow.idempotency_key,
        )
        found: dict[str, Known] = {}
        wanted = list(dict.fromkeys(ids))
        for start in range(0, len(wanted), IN_CHUNK):
            chunk = wanted[start : start + IN_CHUNK]
            rows = await self.session.execute(select(*columns).where(ObservationRow.id.in_(chunk)))
            for row_id, body_hash, deleted_at, created_by, _ in rows:
                found[row_id] = Known(row_id, body_hash, deleted_at is not None, created_by)
        if idempotency_key is not None:
            rows = await self.session.execute(
                select(*columns).where(ObservationRow.idempotency_key == idempotency_key)
            )
            for row_id, body_hash, deleted_at, created_by, key in rows:
                found[f"key:{key}"] = Known(row_id, body_hash, deleted_at is not None, created_by)
        return found

    async def insert_many(self, rows: Sequence[Row]) -> set[str]:
        """Insert; the ids stored (a row whose id or key is taken is left out). Every row has
        the same keys. On PostgreSQL the rows go as one JSON array; on SQLite straight to the
        driver (``sqlite_execute``), ``SQLITE_ROWS_PER_INSERT`` a statement: SQLAlchemy's
        per-call work and trips to the driver's thread cost more than the rows' conversion."""
        if not rows:
            return set()
        connection = await self.session.connection()
        names = tuple(rows[0])
        if connection.dialect.name == "postgresql":
            sql = _insert_new_postgres(names)
            result = await connection.exec_driver_sql(sql, (orjson.dumps(rows).decode(),))
            return set(result.scalars())
        values = sqlite_values(connection.dialect, ObservationRow.__table__, names)
        take = itemgetter(*names)
        inserted: set[str] = set()
        for start in range(0, len(rows), SQLITE_ROWS_PER_INSERT):
            chunk = rows[start : start + SQLITE_ROWS_PER_INSERT]
            params = [value for row in chunk for value in values(take(row))]
            sql = _insert_rows_sqlite(names, len(chunk))
            inserted.update(row_id for (row_id,) in await sqlite_execute(connection, sql, params))
        return inserted

    async def update(self, observation_id: str, values: dict[str, Any]) -> None:
        await self.session.execute(
            update(ObservationRow).where(ObservationRow.id == observation_id).values(**values)
        )

    async def write_back_states(self, ids: Iterable[str]) -> dict[str, WriteBackState]:
        """What the write-backs from other services compare with, of these observations (the
        ones stored), locked until the transaction ends; in id order, so two batches lock
        the rows they share in the same order."""
        columns = (
            ObservationRow.id,
            ObservationRow.dataset_id,
            ObservationRow.quality_assessed_at,
            ObservationRow.best_identification_at,
        )
        wanted = sorted(set(ids))
        found: dict[str, WriteBackState] = {}
        for start in range(0, len(wanted), IN_CHUNK):
            query = (
                select(*columns)
                .where(ObservationRow.id.in_(wanted[start : start + IN_CHUNK]))
                .order_by(ObservationRow.id)
                .with_for_update()
            )
            for row_id, dataset_id, assessed_at, identified_at in await self.session.execute(query):
                found[row_id] = WriteBackState(dataset_id, utc(assessed_at), utc(identified_at))
        return found

    async def update_many(self, changes: Sequence[dict[str, Any]]) -> None:
        """Update observations, each by its ``observation_id``, in one executemany; every
        change has the same keys."""
        if changes:
            connection = await self.session.connection()
            await connection.execute(_UPDATE_BY_ID, list(changes))

    # --- media and identifications ---------------------------------------------------------

    async def media_of(self, ids: Sequence[str]) -> dict[str, list[MediaRow]]:
        out: dict[str, list[MediaRow]] = {i: [] for i in ids}
        for start in range(0, len(ids), IN_CHUNK):
            query = (
                select(MediaRow)
                .where(MediaRow.observation_id.in_(ids[start : start + IN_CHUNK]))
                .order_by(MediaRow.created_at, MediaRow.id)
            )
            for row in (await self.session.execute(query)).scalars():
                out[row.observation_id].append(row)
        return out

    async def identifications_of(self, ids: Sequence[str]) -> dict[str, list[IdentificationRow]]:
        out: dict[str, list[IdentificationRow]] = {i: [] for i in ids}
        for start in range(0, len(ids), IN_CHUNK):
            query = (
                select(IdentificationRow)
                .where(IdentificationRow.observation_id.in_(ids[start : start + IN_CHUNK]))
                .order_by(IdentificationRow.date_identified, IdentificationRow.id)
            )
            for row in (await self.session.execute(query)).scalars():
                out[row.observation_id].append(row)
        return out

    async def media_owner(
        self, observation_id: str, *, for_update: bool = False
    ) -> MediaOwner | None:
        connection = await self.session.connection()
        statement = _MEDIA_OWNER_FOR_UPDATE if for_update else _MEDIA_OWNER
        found = (await connection.execute(statement, {"observation_id": observation_id})).first()
        return None if found is None else MediaOwner(*found)

    async def media_file(self, media_id: str) -> MediaFile | None:
        connection = await self.session.connection()
        found = (await connection.execute(_MEDIA_FILE, {"media_id": media_id})).first()
        return None if found is None else MediaFile(*found)

    async def get_media(self, media_id: str) -> MediaRow | None:
        return await self.session.get(MediaRow, media_id)

    async def add_media(self, row: MediaRow, bump: tuple[datetime, int] | None = None) -> bool:
        """Insert, and count it on its observation (with ``bump``, its new ``updated_at``
        and ``version``); False when the same media id is stored already (nothing changes
        then). No savepoint: the INSERT skips a taken id itself."""
        connection = await self.session.connection()
        values = {c.key: getattr(row, c.key) for c in MediaRow.__table__.columns}
        statement = _INSERT_MEDIA[connection.dialect.name]
        if (await connection.execute(statement, values)).first() is None:
            return False
        counted: dict[str, Any] = {"observation_id": row.observation_id}
        if bump is None:
            await connection.execute(_COUNT_MEDIA, counted)
        else:
            counted["new_updated_at"], counted["new_version"] = bump
            await connection.execute(_COUNT_MEDIA_BUMPED, counted)
        return True

    async def set_public_copy(self, media_id: str, key: str | None, sha256: str | None) -> None:
        await self.session.execute(
            update(MediaRow)
            .where(MediaRow.id == media_id)
            .values(public_key=key, public_sha256=sha256)
        )

    async def add_identification(self, row: IdentificationRow) -> None:
        self.session.add(row)
        await self.session.flush()

    async def add_identifications(self, rows: Sequence[IdentificationRow]) -> None:
        if rows:
            self.session.add_all(rows)
            await self.session.flush()

    # --- listing and exports ---------------------------------------------------------------

    def _conditions(self, f: ObservationFilter) -> list[ColumnElement[bool]]:
        o = ObservationRow
        where: list[ColumnElement[bool]] = []
        if not f.includeDeleted:
            where.append(o.deleted_at.is_(None))
        if f.project is not None:
            where.append(o.dataset_id == f.project)
        if f.recordedBy is not None:
            where.append(o.recorded_by == f.recordedBy)
        if f.name is not None:
            prefix = f.name.lower()
            where.append(
                or_(
                    o.scientific_name_lower.startswith(prefix, autoescape=True),
                    o.vernacular_name_lower.startswith(prefix, autoescape=True),
                )
            )
        box = f.box()
        if box is not None:
            where.append(o.latitude.between(box.min_lat, box.max_lat))
            if box.min_lon <= box.max_lon:
                where.append(o.longitude.between(box.min_lon, box.max_lon))
            else:  # across the antimeridian
                where.append(or_(o.longitude >= box.min_lon, o.longitude <= box.max_lon))
        start, end = f.date_range()
        if start is not None:
            where.append(o.event_start >= start)
        if end is not None:
            where.append(o.event_end <= end)
        if f.qualityGrade is not None:
            where.append(o.quality_grade == f.qualityGrade)
        if f.hasMedia is not None:
            where.append(o.media_count > 0 if f.hasMedia else o.media_count == 0)
        if f.updatedSince is not None:
            where.append(o.updated_at >= f.updatedSince)
        return where

    async def page(
        self,
        f: ObservationFilter,
        *,
        sort: str,
        after: tuple[datetime, int] | None,
        limit: int,
        max_seq: int | None = None,
    ) -> list[ObservationRow]:
        """Keyset page: rows strictly after ``after`` = (sort value, seq) in ``sort`` order."""
        descending = sort.startswith("-")
        column = SORT_COLUMNS[sort.lstrip("-")]
        where = self._conditions(f)
        if max_seq is not None:
            where.append(ObservationRow.seq <= max_seq)
        if after is not None:
            key = tuple_(column, ObservationRow.seq)
            bound = tuple_(*after)
            where.append(key < bound if descending else key > bound)
        order = (
            (column.desc(), ObservationRow.seq.desc())
            if descending
            else (column, ObservationRow.seq)
        )
        query = select(ObservationRow).where(*where).order_by(*order).limit(limit)
        return list((await self.session.execute(query)).scalars())

    async def max_seq(self) -> int:
        return int(await self.session.scalar(select(func.max(ObservationRow.seq))) or 0)

    async def after_seq(
        self, f: ObservationFilter, *, after: int, max_seq: int, limit: int
    ) -> list[ObservationRow]:
        """Matching rows with ``after < seq <= max_seq``, in seq order (exports: keyset
        reads, so memory stays flat whatever the result size)."""
        where = [*self._conditions(f), ObservationRow.seq > after, ObservationRow.seq <= max_seq]
        query = select(ObservationRow).where(*where).order_by(ObservationRow.seq).limit(limit)
        return list((await self.session.execute(query)).scalars())
