"""Database access: an async SQLAlchemy engine per service, SQLite by default (a WAL file
under ``data/``) or PostgreSQL by URL (a schema per service), and Alembic migrations applied
at start-up without an ``env.py``.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.script import ScriptDirectory
from fastapi import Depends, Request
from pydantic import AfterValidator
from sqlalchemy import (
    ColumnElement,
    CompoundSelect,
    Connection,
    Delete,
    FromClause,
    Select,
    Table,
    any_,
    delete,
    event,
    func,
    literal_column,
    select,
    text,
    union_all,
)
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.pool import ConnectionPoolEntry, PoolResetState
from sqlalchemy.util import await_only

log = logging.getLogger("c4c.db")

SHARED_MIGRATIONS = "c4c.shared:migrations"
"""The suite's own tables (outbox, processed events), versioned apart from the service's."""


def delete_some(table: Table, where: ColumnElement[bool], limit: int, dialect: str) -> Delete:
    """A DELETE of up to ``limit`` rows that match ``where`` (pruning in short transactions),
    found by their address: PostgreSQL's ``ctid`` in an array, SQLite's ``rowid``. PostgreSQL
    plans a ``key IN (SELECT key … LIMIT n)`` as a join over the whole table (53 ms at
    300,000 rows against 3 ms). ``where`` is checked again on each row, so one changed since
    it was chosen is left for the next pass."""
    assert table.dialect_options["sqlite"].get("with_rowid", True), "a table without rowid"
    address: ColumnElement[Any] = literal_column("ctid" if dialect == "postgresql" else "rowid")
    chosen = select(address).select_from(table).where(where).limit(limit)
    if dialect == "postgresql":
        found = address == any_(func.array(chosen.scalar_subquery()))
    else:
        found = address.in_(chosen)
    return delete(table).where(found, where)


def union_of_limited(
    arms: Sequence[Select[*tuple[Any, ...]]],
) -> CompoundSelect[Any] | Select[Any]:
    """The rows of every arm, each arm ordered and limited on its own (a few rows from each
    of several index ranges: each read stops at its limit, where one query with OR or IN
    over them all reads them whole). SQLite takes an arm's ORDER BY and LIMIT only inside a
    subquery."""
    if len(arms) == 1:
        return arms[0]
    subqueries = [arm.subquery() for arm in arms]
    return union_all(*(select(*sub.c) for sub in subqueries))


def as_utc(moment: datetime) -> datetime:
    """``moment`` in UTC: SQLite gives back the naive UTC times it was given."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


Utc = Annotated[datetime, AfterValidator(as_utc)]
"""A time answered with its UTC offset (``Z``), whatever the database gave back."""

READERS = 4
"""Connections a SQLite database keeps for read-only sessions."""
POSTGRES_POOL, POSTGRES_OVERFLOW = 12, 3
"""Connections a PostgreSQL pool keeps once opened (by default), and opens beyond them only
for a while."""

_BEGIN_UNSETTLED = "c4c.sqlite_begin_unsettled"
"""Key in a pooled SQLite connection's info: its last BEGIN was sent, its outcome not seen."""


class InfraBase(DeclarativeBase):
    """Tables every service has, owned by ``c4c.shared``."""


class Database:
    def __init__(
        self, url: str, *, schema: str | None = None, pool_size: int = POSTGRES_POOL
    ) -> None:
        self.url = make_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        self.is_postgres = self.url.get_backend_name() == "postgresql"
        self.schema = schema if self.is_postgres else None
        options: dict[str, Any] = {}
        if self.is_sqlite:
            database = self.url.database
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
                # Every transaction takes the write lock (see _sqlite_on_begin), so one
                # connection loses nothing; it makes transactions queue in the pool, in order,
                # without blocking the loop, where SQLite's busy handler polls with sleeps of
                # up to 100 ms and starves the unlucky (seconds at p99 under load).
                options.update(pool_size=1, max_overflow=0, pool_timeout=30)
            options.update(connect_args={"timeout": 30}, pool_reset_on_return=None)
        elif self.is_postgres:
            # Keep what load opened: SQLAlchemy's default (5 kept, 10 more closed as soon as
            # they are given back) made a service under load open a connection per request
            # beyond five — a server process forked, authenticated, its type codecs looked
            # up, its statements prepared again. At most 15 a process by default, as before.
            options.update(pool_size=pool_size, max_overflow=POSTGRES_OVERFLOW)
            if self.schema:
                options["connect_args"] = {"server_settings": {"search_path": self.schema}}
        self.engine: AsyncEngine = create_async_engine(self.url, **options)
        if self.is_sqlite:
            event.listen(self.engine.sync_engine, "connect", _sqlite_on_connect)
            event.listen(self.engine.sync_engine, "begin", _sqlite_on_begin)
            event.listen(self.engine.sync_engine.pool, "reset", _sqlite_on_reset)
        elif self.is_postgres:
            event.listen(self.engine.sync_engine.pool, "checkout", _postgres_on_checkout)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        # Sessions that only read. On SQLite they have their own connections, which begin
        # deferred and are query-only: in WAL mode they read a snapshot beside the one writer
        # instead of queueing behind it. Elsewhere they are the ordinary sessions.
        self.readers = self.sessions
        self._read_engine: AsyncEngine | None = None
        if self.is_sqlite and self.url.database and self.url.database != ":memory:":
            self._read_engine = create_async_engine(
                self.url,
                pool_size=READERS,
                max_overflow=0,
                pool_timeout=30,
                pool_reset_on_return=None,
                connect_args={"timeout": 30},
            )
            event.listen(self._read_engine.sync_engine, "connect", _sqlite_reader_on_connect)
            event.listen(self._read_engine.sync_engine, "begin", _sqlite_reader_on_begin)
            event.listen(self._read_engine.sync_engine.pool, "reset", _sqlite_on_reset)
            self.readers = async_sessionmaker(self._read_engine, expire_on_commit=False)

    async def migrate(self, locations: Sequence[str]) -> None:
        """Bring the schema to head: the shared tables first, then each of ``locations``
        (``package:folder`` or a path), each with its own version table."""
        async with self.engine.begin() as conn:
            if self.is_postgres:
                # Replicas starting together migrate one at a time (schema creation included:
                # IF NOT EXISTS alone still races on the catalogue's unique index).
                await conn.execute(
                    text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
                    {"key": f"c4c-migrate:{self.schema}"},
                )
                if self.schema:
                    await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"'))
            await conn.run_sync(_upgrade, SHARED_MIGRATIONS, "c4c_shared_version", self.schema)
            for location in locations:
                await conn.run_sync(_upgrade, location, "alembic_version", self.schema)

    async def ping(self) -> bool:
        try:
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception:
            log.warning("database unreachable", exc_info=True)
            return False
        return True

    async def dispose(self) -> None:
        await self.engine.dispose()
        if self._read_engine is not None:
            await self._read_engine.dispose()


def _sqlite_on_connect(dbapi_connection: Any, _: Any) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN itself (see _sqlite_on_begin).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_reader_on_connect(dbapi_connection: Any, _: Any) -> None:
    dbapi_connection.isolation_level = None  # BEGIN is ours (see _sqlite_reader_on_begin)
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA query_only=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_reader_on_begin(conn: Connection) -> None:
    # Deferred: a read transaction takes no lock in WAL mode, and sees one snapshot.
    _begin(conn, "BEGIN")


def _sqlite_on_begin(conn: Connection) -> None:
    # Take the write lock up front: a deferred transaction that upgrades from read to write
    # fails with SQLITE_BUSY instead of waiting, whatever the busy timeout.
    _begin(conn, "BEGIN IMMEDIATE")


def _begin(conn: Connection, statement: str) -> None:
    # Straight on aiosqlite's connection (SQLAlchemy's way for awaitable-only driver calls in
    # events), in one trip to its thread (about 40 µs of CPU each, measured), where a cursor
    # through the adapter takes three. The cursor lives and dies on that thread, within the
    # trip: none is left to the garbage collector to outlive its connection.
    driver: Any = conn.connection.driver_connection  # aiosqlite's, for a connection in use
    try:
        await_only(driver.execute_fetchall(statement))
    except BaseException:
        # Cancelled (a client gone) or failed: the BEGIN may still run on aiosqlite's thread,
        # after the connection is back in the pool, where no transaction shows yet.
        conn.connection.info[_BEGIN_UNSETTLED] = True
        raise


async def sqlite_execute(
    connection: AsyncConnection, statement: str, parameters: Sequence[Any] = ()
) -> list[Any]:
    """``statement`` straight on aiosqlite's connection: one trip to its thread, where a
    statement through SQLAlchemy takes four (cursor, execute, fetch, close; about 40 µs of
    CPU each, measured). Its rows (of a RETURNING) as they come. For hot paths: the
    parameters go as they are, no column type converts them (see ``sqlite_values``), and a
    session's pending objects are not flushed first.

    It runs in ``connection``'s transaction if one has begun (``session.connection()`` of a
    session in a transaction has); else it is its own (the connection is in autocommit
    mode, see ``_sqlite_on_connect``). Errors are SQLAlchemy's, as through it."""
    raw = await connection.get_raw_connection()
    driver: Any = raw.driver_connection  # aiosqlite's
    try:
        return list(await driver.execute_fetchall(statement, parameters))
    except sqlite3.Error as exc:
        raise DBAPIError.instance(statement, parameters, exc, sqlite3.Error) from exc


@lru_cache(maxsize=16)  # an app's dialect, kept while in use (tests make many apps)
def sqlite_values(
    dialect: Dialect, table: FromClause, names: tuple[str, ...]
) -> Callable[[Sequence[Any]], list[Any]]:
    """For ``sqlite_execute``: values given in the order of ``names``, each converted by its
    column's own bind processor where it has one (a time to SQLite's text, JSON to its
    text), so that they are stored as the ORM stores them. The rest go as they are."""
    processors = [table.c[n].type.dialect_impl(dialect).bind_processor(dialect) for n in names]
    converted = [(i, process) for i, process in enumerate(processors) if process is not None]

    def values(row: Sequence[Any]) -> list[Any]:
        out = list(row)
        for i, process in converted:
            out[i] = process(out[i])
        return out

    return values


def _sqlite_on_reset(
    dbapi_connection: Any, record: ConnectionPoolEntry | None, state: PoolResetState
) -> None:
    # The pool's own reset (``pool_reset_on_return``, off for SQLite) rolls back every
    # connection it takes back, most of them just committed: a trip to aiosqlite's thread
    # each for nothing. SQLite tells without a trip whether a transaction is open, unless
    # a BEGIN is still queued on that thread (see _begin): the rollback, queued behind it,
    # ends the transaction it opens.
    begin_unsettled = record is not None and record.info.pop(_BEGIN_UNSETTLED, False)
    if state.asyncio_safe and (
        begin_unsettled or dbapi_connection.driver_connection.in_transaction
    ):
        dbapi_connection.rollback()


def _postgres_on_checkout(dbapi_connection: Any, *_: Any) -> None:
    # A pooled connection the server closed (a restart, an idle timeout) is replaced before
    # use. asyncpg notices the closed socket itself, so this costs no round trip, where
    # pool_pre_ping costs three (BEGIN, a query, ROLLBACK) on every checkout.
    if dbapi_connection.driver_connection.is_closed():
        raise DisconnectionError("the server closed this pooled connection")


def _upgrade(connection: Connection, location: str, version_table: str, schema: str | None) -> None:
    config = Config()
    config.set_main_option("script_location", location)
    script = ScriptDirectory.from_config(config)

    def upgrade(revision: Any, _: Any) -> Any:
        return script._upgrade_revs("head", revision)

    with EnvironmentContext(config, script, fn=upgrade, destination_rev="head") as env:
        env.configure(
            connection=connection, version_table=version_table, version_table_schema=schema
        )
        with env.begin_transaction():
            env.run_migrations()
    log.info("migrated", extra={"location": location})


async def _request_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One session per request; the request commits when its handler returns."""
    database: Database = request.app.state.runtime.db
    async with database.sessions() as session, session.begin():
        yield session


async def _request_read_session(request: Request) -> AsyncIterator[AsyncSession]:
    """A read-only session for a request that writes nothing (see ``Database.readers``)."""
    database: Database = request.app.state.runtime.db
    async with database.readers() as session, session.begin():
        yield session


SessionDep = Annotated[AsyncSession, Depends(_request_session, scope="function")]
ReadSessionDep = Annotated[AsyncSession, Depends(_request_read_session, scope="function")]
