"""Databases: SQLite in WAL mode for embedded mode, a PostgreSQL schema per service, and the
shared tables migrated at start-up — idempotently, and safely when replicas start together."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from sqlalchemy import delete, event, func, inspect, select, text
from sqlalchemy.exc import IntegrityError, OperationalError

from c4c.shared import outbox as outbox_module
from c4c.shared.bus import InProcessBus, PublishError, new_event
from c4c.shared.db import Database, as_utc, sqlite_execute
from c4c.shared.outbox import Outbox, OutboxRow, RelayPass

SHARED_TABLES = {"c4c_outbox", "c4c_processed_events", "c4c_shared_version"}
HEAD = "c4c_shared_0003"


@pytest.fixture
async def sqlite_db(tmp_path: Path) -> AsyncIterator[Database]:
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/nested/dir/demo.db")
    yield db
    await db.dispose()


async def table_names(db: Database, schema: str | None = None) -> set[str]:
    async with db.engine.connect() as conn:
        names = await conn.run_sync(lambda sync: inspect(sync).get_table_names(schema=schema))
    return set(names)


async def shared_version(db: Database) -> list[str]:
    async with db.engine.connect() as conn:
        return list((await conn.scalars(text("SELECT version_num FROM c4c_shared_version"))).all())


# --- SQLite --------------------------------------------------------------------------------


async def test_sqlite_migrate_creates_the_shared_tables_in_wal_mode(
    sqlite_db: Database, tmp_path: Path
) -> None:
    await sqlite_db.migrate([])
    assert (tmp_path / "nested" / "dir" / "demo.db").is_file()
    assert await table_names(sqlite_db) >= SHARED_TABLES
    assert await shared_version(sqlite_db) == [HEAD]
    async with sqlite_db.engine.connect() as conn:
        assert await conn.scalar(text("PRAGMA journal_mode")) == "wal"
        assert await conn.scalar(text("PRAGMA foreign_keys")) == 1
        assert await conn.scalar(text("PRAGMA busy_timeout")) == 30000
    assert await sqlite_db.ping()


async def test_sqlite_migrate_twice_keeps_data(sqlite_db: Database) -> None:
    await sqlite_db.migrate([])
    outbox = Outbox(sqlite_db, InProcessBus(), service="demo")
    async with sqlite_db.sessions() as session, session.begin():
        outbox.add(session, new_event("demo", "demo.kept", {"n": 1}))
    await sqlite_db.migrate([])
    assert await shared_version(sqlite_db) == [HEAD]
    async with sqlite_db.sessions() as session:
        assert await session.scalar(select(OutboxRow.type)) == "demo.kept"


async def test_sqlite_concurrent_writers_do_not_hit_database_is_locked(
    sqlite_db: Database,
) -> None:
    await sqlite_db.migrate([])
    outbox = Outbox(sqlite_db, InProcessBus(), service="demo")

    async def write(n: int) -> None:
        async with sqlite_db.sessions() as session, session.begin():
            # Read first, then write: the pattern a deferred transaction cannot upgrade.
            await session.scalar(select(func.count()).select_from(OutboxRow))
            outbox.add(session, new_event("demo", "demo.written", {"n": n}, subject=f"s{n}"))
            await session.flush()
            await asyncio.sleep(0)  # let the other writers in while the transaction is open

    results = await asyncio.gather(*(write(n) for n in range(20)), return_exceptions=True)
    assert [r for r in results if isinstance(r, BaseException)] == []
    async with sqlite_db.sessions() as session:
        assert await session.scalar(select(func.count()).select_from(OutboxRow)) == 20


async def test_sqlite_readers_see_a_snapshot_beside_an_open_writer_and_cannot_write(
    sqlite_db: Database,
) -> None:
    await sqlite_db.migrate([])
    outbox = Outbox(sqlite_db, InProcessBus(), service="demo")
    async with sqlite_db.sessions() as writer, writer.begin():
        outbox.add(writer, new_event("demo", "demo.pending", {"n": 1}))
        await writer.flush()  # the write lock is held from here to the commit
        async with sqlite_db.readers() as reader, reader.begin():
            # Answered at once from the last commit, not after the writer's commit.
            count = await asyncio.wait_for(
                reader.scalar(select(func.count()).select_from(OutboxRow)), timeout=5
            )
            assert count == 0
    async with sqlite_db.readers() as reader, reader.begin():
        assert await reader.scalar(select(func.count()).select_from(OutboxRow)) == 1
        with pytest.raises(OperationalError, match="readonly"):
            await reader.execute(delete(OutboxRow))


async def test_sqlite_writers_from_two_engines_on_one_file(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/shared.db"
    first, second = Database(url), Database(url)
    try:
        await first.migrate([])
        outboxes = [Outbox(db, InProcessBus(), service="demo") for db in (first, second)]

        async def write(n: int) -> None:
            db, outbox = (first, outboxes[0]) if n % 2 else (second, outboxes[1])
            async with db.sessions() as session, session.begin():
                await session.scalar(select(func.count()).select_from(OutboxRow))
                outbox.add(session, new_event("demo", "demo.written", {"n": n}))

        results = await asyncio.gather(*(write(n) for n in range(20)), return_exceptions=True)
        assert [r for r in results if isinstance(r, BaseException)] == []
        async with second.sessions() as session:
            assert await session.scalar(select(func.count()).select_from(OutboxRow)) == 20
    finally:
        await first.dispose()
        await second.dispose()


async def test_sqlite_connections_go_back_to_the_pool_without_a_rollback_after_a_commit(
    sqlite_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    await sqlite_db.migrate([])
    outbox = Outbox(sqlite_db, InProcessBus(), service="demo")
    async with sqlite_db.engine.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection  # the pool's only one
    rollbacks: list[bool] = []
    rollback = driver.rollback

    async def counted() -> None:
        rollbacks.append(driver.in_transaction)
        await rollback()

    monkeypatch.setattr(driver, "rollback", counted)
    async with sqlite_db.sessions() as session, session.begin():
        outbox.add(session, new_event("demo", "demo.kept", {"n": 1}))
    assert rollbacks == []  # committed: a rollback would be a thread trip for nothing

    async def fail() -> None:
        async with sqlite_db.sessions() as session, session.begin():
            outbox.add(session, new_event("demo", "demo.dropped", {"n": 2}))
            await session.flush()
            raise RuntimeError("the handler failed")

    with pytest.raises(RuntimeError):
        await fail()
    assert rollbacks == [True]
    async with sqlite_db.sessions() as session:
        assert list(await session.scalars(select(OutboxRow.type))) == ["demo.kept"]


async def test_sqlite_a_connection_back_in_the_pool_with_a_transaction_open_is_rolled_back(
    sqlite_db: Database,
) -> None:
    await sqlite_db.migrate([])
    async with sqlite_db.engine.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection
        cursor = await driver.execute("BEGIN IMMEDIATE")  # behind SQLAlchemy's back
        await cursor.close()
        assert driver.in_transaction
    async with sqlite_db.engine.connect() as conn:
        assert (await conn.get_raw_connection()).driver_connection is driver
        assert not driver.in_transaction  # else it would hold the write lock for good


async def test_sqlite_a_transaction_cancelled_while_it_begins_goes_back_to_the_pool_ended(
    sqlite_db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A cancelled await (a client gone) does not stop aiosqlite's thread: the BEGIN runs
    # there after the connection is back in the pool, and the next transaction on it fails
    # with "cannot start a transaction within a transaction".
    await sqlite_db.migrate([])
    async with sqlite_db.engine.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection  # the pool's only one
    beginning, resetting = asyncio.Event(), asyncio.Event()
    execute_fetchall = driver.execute_fetchall

    def sent(statement: str, *args: object) -> object:
        if statement.startswith("BEGIN"):
            beginning.set()
        return execute_fetchall(statement, *args)

    monkeypatch.setattr(driver, "execute_fetchall", sent)
    event.listen(
        sqlite_db.engine.sync_engine.pool, "reset", lambda *_: resetting.set(), insert=True
    )
    # Another connection holds the write lock: the session's BEGIN IMMEDIATE waits for it on
    # aiosqlite's thread, still to run, until the lock is released.
    lock_holder = sqlite3.connect(tmp_path / "nested" / "dir" / "demo.db", isolation_level=None)
    try:
        lock_holder.execute("BEGIN IMMEDIATE")

        async def write() -> None:
            async with sqlite_db.sessions() as session, session.begin():
                await session.execute(text("SELECT 1"))

        writing = asyncio.create_task(write())
        await asyncio.wait_for(beginning.wait(), timeout=5)  # its BEGIN is on the thread
        writing.cancel()
        await asyncio.wait_for(resetting.wait(), timeout=5)  # on its way back to the pool
        lock_holder.execute("COMMIT")  # the cancelled BEGIN runs now
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(writing, timeout=5)
    finally:
        lock_holder.close()
    async with sqlite_db.sessions() as session, session.begin():
        assert await session.scalar(text("SELECT 1")) == 1
    async with sqlite_db.engine.connect() as conn:
        assert not (await conn.get_raw_connection()).driver_connection.in_transaction


async def test_sqlite_statements_straight_on_the_driver_fail_with_sqlalchemy_errors(
    sqlite_db: Database,
) -> None:
    await sqlite_db.migrate([])
    async with sqlite_db.sessions() as session, session.begin():
        conn = await session.connection()
        await sqlite_execute(conn, "CREATE TABLE unique_n (n INTEGER UNIQUE)")
        await sqlite_execute(conn, "INSERT INTO unique_n VALUES (1)")
        # What the problem handlers and the pool know, not the driver's own classes.
        with pytest.raises(IntegrityError):
            await sqlite_execute(conn, "INSERT INTO unique_n VALUES (1)")
        with pytest.raises(OperationalError):
            await sqlite_execute(conn, "SELECT nothing FROM nowhere")


async def test_sqlite_statements_straight_on_the_driver_take_one_trip_in_the_transaction(
    sqlite_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    await sqlite_db.migrate([])
    async with sqlite_db.engine.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection  # the pool's only one
    trips: list[object] = []
    execute = driver._execute

    async def counted(function: object, *args: object, **kwargs: object) -> object:
        trips.append(function)  # each call is one trip to aiosqlite's thread
        return await execute(function, *args, **kwargs)

    monkeypatch.setattr(driver, "_execute", counted)
    async with sqlite_db.sessions() as session, session.begin():
        conn = await session.connection()
        assert len(trips) == 1  # BEGIN IMMEDIATE
        assert driver.in_transaction
        await sqlite_execute(conn, "CREATE TABLE kept (n INTEGER)")
        rows = await sqlite_execute(conn, "INSERT INTO kept VALUES (?), (?) RETURNING n", [1, 2])
        assert sorted(rows) == [(1,), (2,)]
        assert len(trips) == 3

    async def fail() -> None:
        async with sqlite_db.sessions() as session, session.begin():
            await sqlite_execute(await session.connection(), "INSERT INTO kept VALUES (3)")
            raise RuntimeError("the handler failed")

    with pytest.raises(RuntimeError):
        await fail()
    async with sqlite_db.engine.connect() as conn:
        assert sorted(await sqlite_execute(conn, "SELECT n FROM kept")) == [(1,), (2,)]


class RecordingBus(InProcessBus):
    """Remembers the bodies it is asked to publish; refuses those of the subjects in
    ``refused``."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []
        self.refused = {"refused"}

    async def publish_encoded(self, body: bytes, *, event_id: str, type: str, source: str) -> None:
        if orjson.loads(body).get("subject") in self.refused:
            raise PublishError("the broker said no")
        self.bodies.append(body)


async def test_sqlite_outbox_rows_written_and_relayed_straight_on_the_driver_as_the_orm_would(
    sqlite_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    await sqlite_db.migrate([])
    bus = RecordingBus()
    outbox = Outbox(sqlite_db, bus, service="demo")
    monkeypatch.setattr(outbox_module, "SQLITE_ROWS_PER_INSERT", 2)  # several statements
    async with sqlite_db.sessions() as session, session.begin():
        outbox.add(session, new_event("demo", "demo.one", {"n": 0}))  # through the ORM
        await session.flush()
        items = [(f"obs/{n}", {"n": n}) for n in range(1, 5)] + [("refused", {"n": 5})]
        ids = await outbox.add_batch(session, "demo.many", items)

    stored = "SELECT typeof(body), typeof(created_at), attempts FROM c4c_outbox"
    async with sqlite_db.engine.connect() as conn:
        kinds = set(await sqlite_execute(conn, stored))
    assert kinds == {("blob", "text", 0)}  # the ORM's row and the batch's alike
    async with sqlite_db.sessions() as session:
        rows = (await session.execute(select(OutboxRow).order_by(OutboxRow.id))).scalars().all()
    assert [r.event_id for r in rows[1:]] == ids
    for row in rows:
        envelope = orjson.loads(row.body)
        assert as_utc(row.created_at) == datetime.fromisoformat(envelope["time"])
        assert (row.type, row.subject) == (envelope["type"], envelope.get("subject"))

    async with sqlite_db.engine.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection  # the pool's only one
    trips: list[object] = []
    execute = driver._execute

    async def counted(function: object, *args: object, **kwargs: object) -> object:
        trips.append(function)
        return await execute(function, *args, **kwargs)

    monkeypatch.setattr(driver, "_execute", counted)
    assert await outbox.relay_once() == RelayPass(published=5, failed=1)
    bus.refused.clear()
    trips.clear()
    assert await outbox.relay_once() == RelayPass(published=1, failed=0)
    assert len(trips) == 2  # reading and marking, a trip each, no BEGIN or COMMIT
    assert bus.bodies == [r.body for r in rows]
    async with sqlite_db.sessions() as session:
        marked = {
            r.event_id: (r.published_at, r.attempts)
            for r in (await session.execute(select(OutboxRow))).scalars()
        }
    for row in rows:
        published_at, attempts = marked[row.event_id]
        assert attempts == (1 if row.subject == "refused" else 0)
        assert published_at is not None
        assert as_utc(row.created_at) <= as_utc(published_at) <= datetime.now(UTC)


# --- PostgreSQL ----------------------------------------------------------------------------


async def public_tables(db: Database) -> set[str]:
    return await table_names(db, "public")


async def test_postgres_migrate_creates_tables_inside_the_schema(
    postgres_url: str, postgres_schema: str
) -> None:
    db = Database(postgres_url, schema=postgres_schema)
    try:
        public_before = await public_tables(db)
        await db.migrate([])
        assert await table_names(db, postgres_schema) >= SHARED_TABLES
        assert await public_tables(db) == public_before
        async with db.engine.connect() as conn:
            # The service's unqualified table names resolve to its own schema.
            located = await conn.scalar(
                text(
                    "SELECT n.nspname FROM pg_class c JOIN pg_namespace n"
                    " ON n.oid = c.relnamespace WHERE c.oid = 'c4c_outbox'::regclass"
                )
            )
            assert located == postgres_schema
            assert await conn.scalar(text("SELECT current_schema()")) == postgres_schema
        assert await shared_version(db) == [HEAD]
        assert await db.ping()
    finally:
        await db.dispose()


async def test_postgres_migrate_twice_is_a_no_op(postgres_url: str, postgres_schema: str) -> None:
    db = Database(postgres_url, schema=postgres_schema)
    try:
        await db.migrate([])
        outbox = Outbox(db, InProcessBus(), service="demo")
        async with db.sessions() as session, session.begin():
            outbox.add(session, new_event("demo", "demo.kept", {"n": 1}))
        await db.migrate([])
        assert await shared_version(db) == [HEAD]
        async with db.sessions() as session:
            assert await session.scalar(select(OutboxRow.type)) == "demo.kept"
    finally:
        await db.dispose()


async def test_postgres_replicas_migrating_an_existing_schema_together(
    postgres_url: str, postgres_schema: str
) -> None:
    setup = Database(postgres_url, schema=postgres_schema)
    async with setup.engine.begin() as conn:
        await conn.execute(text(f'CREATE SCHEMA "{postgres_schema}"'))
    await setup.dispose()
    replicas = [Database(postgres_url, schema=postgres_schema) for _ in range(3)]
    try:
        results = await asyncio.gather(*(r.migrate([]) for r in replicas), return_exceptions=True)
        assert [r for r in results if isinstance(r, BaseException)] == []
        assert await table_names(replicas[0], postgres_schema) >= SHARED_TABLES
        assert await shared_version(replicas[0]) == [HEAD]
    finally:
        for replica in replicas:
            await replica.dispose()


async def test_postgres_replicas_migrating_a_fresh_schema_together(
    postgres_url: str, postgres_schema: str
) -> None:
    # The race loses most of the time, not always: ten rounds make the outcome certain.
    for round_ in range(10):
        schema = f"{postgres_schema}_{round_}"
        replicas = [Database(postgres_url, schema=schema) for _ in range(2)]
        try:
            results = await asyncio.gather(
                *(r.migrate([]) for r in replicas), return_exceptions=True
            )
            assert [r for r in results if isinstance(r, BaseException)] == []
            assert await table_names(replicas[0], schema) >= SHARED_TABLES
        finally:
            async with replicas[0].engine.begin() as conn:
                await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            for replica in replicas:
                await replica.dispose()


async def test_postgres_keeps_the_connections_load_opened(
    postgres_url: str, postgres_schema: str
) -> None:
    """Twelve sessions at once, twice: the second round opens no connection (SQLAlchemy's
    default pool closed all but five, so each round forked seven server processes anew)."""
    db = Database(postgres_url, schema=postgres_schema)
    opened = 0

    def on_connect(*_: object) -> None:
        nonlocal opened
        opened += 1

    event.listen(db.engine.sync_engine, "connect", on_connect)
    all_in = asyncio.Barrier(12)

    async def one() -> None:
        async with db.sessions() as session, session.begin():
            await session.execute(text("SELECT 1"))
            await all_in.wait()  # all twelve hold a connection at once

    try:
        await asyncio.gather(*(one() for _ in range(12)))
        assert opened == 12
        await asyncio.gather(*(one() for _ in range(12)))
        assert opened == 12
    finally:
        await db.dispose()
