"""Transactional outbox: an event is written in the same transaction as the data it speaks
of, and a relay publishes it afterwards with confirms, in order per aggregate (subject).
A crash between publish and mark publishes it again: consumers are idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

import orjson
from sqlalchemy import (
    DateTime,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    delete,
    event,
    func,
    select,
    text,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Mapped, Session, mapped_column

from c4c.shared.bus import CloudEvent, EventBus, event_source, new_event
from c4c.shared.db import Database, InfraBase, sqlite_execute, sqlite_values
from c4c.shared.inbox import prune_processed
from c4c.shared.metrics import OUTBOX_BACKLOG, OUTBOX_RELAYED

log = logging.getLogger("c4c.outbox")


class OutboxRow(InfraBase):
    __tablename__ = "c4c_outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(64), unique=True)
    type: Mapped[str] = mapped_column(String(200))
    subject: Mapped[str | None] = mapped_column(String(200))
    body: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)

    # What the relay reads, in its order (see migration c4c_shared_0002).
    __table_args__ = (
        Index(
            "ix_c4c_outbox_unpublished",
            "id",
            postgresql_where=text("published_at IS NULL"),
            sqlite_where=text("published_at IS NULL"),
        ),
    )


Connect = Callable[[], AbstractAsyncContextManager[AsyncConnection]]


_INSERT_BATCH_POSTGRES = """
INSERT INTO c4c_outbox (event_id, subject, body, type, created_at, attempts)
SELECT u.*, $4::text, $5::timestamptz, 0 FROM unnest($1::text[], $2::text[], $3::bytea[]) AS u
"""

_SQLITE_COLUMNS = ("event_id", "subject", "body", "type", "created_at", "attempts")
SQLITE_ROWS_PER_INSERT = 1000  # x 6 columns: well under SQLite's 32,766 parameters


@lru_cache(maxsize=8)
def _insert_rows_sqlite(count: int) -> str:
    """SQLite's INSERT of ``count`` events as one VALUES list, for the driver straight: its
    text depends on the count, so the few counts in use are kept."""
    row = f"({', '.join('?' * len(_SQLITE_COLUMNS))})"
    return (
        f"INSERT INTO c4c_outbox ({', '.join(_SQLITE_COLUMNS)})"  # noqa: S608 - constants
        f" VALUES {', '.join([row] * count)}"
    )


async def _insert_batch_sqlite(
    connection: AsyncConnection,
    ids: list[str],
    subjects: list[str | None],
    bodies: list[bytes],
    type: str,
    time: datetime,
) -> None:
    """The events straight on SQLite's driver (``sqlite_execute``), ``SQLITE_ROWS_PER_INSERT``
    a statement: through SQLAlchemy, its executemany takes four trips to the driver's thread
    and converts every row on its own (a single create cost about 40 µs of CPU more, 16 in
    flight, measured). Values converted as the ORM converts them (``sqlite_values``)."""
    values = sqlite_values(connection.dialect, OutboxRow.__table__, _SQLITE_COLUMNS)
    rows = [values((i, s, b, type, time, 0)) for i, s, b in zip(ids, subjects, bodies, strict=True)]
    for start in range(0, len(rows), SQLITE_ROWS_PER_INSERT):
        chunk = rows[start : start + SQLITE_ROWS_PER_INSERT]
        params = [value for row in chunk for value in row]
        await sqlite_execute(connection, _insert_rows_sqlite(len(chunk)), params)


_MARK_PUBLISHED_POSTGRES = "UPDATE c4c_outbox SET published_at = $1 WHERE id = ANY($2::int4[])"

# SQLite's relay statements, each straight on the driver (``sqlite_execute``) outside any
# transaction of SQLAlchemy's: one statement is its own transaction there, one trip to the
# driver's thread where BEGIN, the statement through SQLAlchemy and COMMIT take six.
_PENDING_SQLITE = (
    "SELECT id, subject, event_id, type, body FROM c4c_outbox"
    " WHERE published_at IS NULL ORDER BY id LIMIT ?"
)
# The ids as one JSON array: the same text (and compiled statement) whatever their number.
_MARK_PUBLISHED_SQLITE = (
    "UPDATE c4c_outbox SET published_at = ? WHERE id IN (SELECT value FROM json_each(?))"
)
PUBLISHERS = 256
"""Events a relay pass has in flight at most (one an aggregate, in order within it): the
in-process bus answers a publish once its consumers (64 per queue) have handled it, RabbitMQ
once it confirms; more in flight than that gains nothing."""


def event_id_text() -> str:
    """A random (version 4) UUID as ``str(uuid.uuid4())`` writes it, in half its 3 µs (one
    for every event of a batch, measured)."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # the version
    raw[8] = raw[8] & 0x3F | 0x80  # the RFC 4122 variant
    digits = raw.hex()
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


class Outbox:
    """Writes events into the caller's transaction and relays them to the bus."""

    def __init__(
        self,
        db: Database,
        bus: EventBus,
        *,
        service: str,
        poll_interval: float = 1.0,
        batch_size: int = 1000,
        retention: timedelta = timedelta(days=7),
    ) -> None:
        self.db = db
        self.bus = bus
        self.service = service
        self._source = event_source(service)
        self.poll_interval = poll_interval
        self.batch_size = batch_size
        self._pending = (  # built once: a relay pass of a few events is mostly overhead
            select(
                OutboxRow.id, OutboxRow.subject, OutboxRow.event_id, OutboxRow.type, OutboxRow.body
            )
            .where(OutboxRow.published_at.is_(None))
            .order_by(OutboxRow.id)
            .limit(batch_size)
        )
        self.retention = retention
        self._next_prune = 0.0
        self._lock: AsyncConnection | None = None  # PostgreSQL: holds the relay lock
        self._next_lock_attempt = 0.0
        self._next_backlog_count = 0.0
        self._backlog_counted = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def add(self, session: AsyncSession, event: CloudEvent) -> None:
        """Queue ``event``, one of this service's (``ServiceRuntime.event``), in ``session``'s
        transaction; the relay sends it once committed."""
        session.add(
            OutboxRow(
                event_id=event.id,
                type=event.type,
                subject=event.subject,
                body=event.to_json(),
                created_at=event.time,
                attempts=0,
            )
        )
        session.sync_session.info["c4c_outbox"] = self

    async def add_batch(
        self, session: AsyncSession, type: str, items: Iterable[tuple[str | None, Any]]
    ) -> list[str]:
        """Write many events of one ``type`` from this service, given as (subject, data),
        into ``session``'s transaction now, in one statement. Their envelopes are made from
        one template (the JSON ``CloudEvent.to_json`` writes, one time for all) and encoded
        with orjson: a model per event costs more than the rest of a batch's item. The
        events' ids, in order."""
        template = new_event(self.service, type, None)
        base = template.model_dump(mode="json", exclude_none=True)
        ids: list[str] = []
        subjects: list[str | None] = []
        bodies: list[bytes] = []
        for subject, data in items:
            event_id = event_id_text()
            envelope = {**base, "id": event_id, "data": data}
            if subject is not None:
                envelope["subject"] = subject
            ids.append(event_id)
            subjects.append(subject)
            bodies.append(orjson.dumps(envelope))
        if not ids:
            return ids
        connection = await session.connection()
        if connection.dialect.name == "postgresql":  # arrays: one statement, few parameters
            params = (ids, subjects, bodies, type, template.time)
            await connection.exec_driver_sql(_INSERT_BATCH_POSTGRES, params)
        else:
            await _insert_batch_sqlite(connection, ids, subjects, bodies, type, template.time)
        session.sync_session.info["c4c_outbox"] = self
        return ids

    def wake(self) -> None:
        self._wake.set()

    async def relay_once(self) -> RelayPass:
        """Publish what is pending, oldest first."""
        if not self.db.is_postgres:
            return await self._publish_pending(self.db.engine.connect)
        connection = await self._relay_connection()
        if connection is None:
            return RelayPass(0, 0)
        try:
            return await self._publish_pending(lambda: contextlib.nullcontext(connection))
        except BaseException:
            await self._drop_lock()  # the connection may be broken: a fresh one next pass
            raise
        finally:
            if asyncio.current_task() is not self._task:
                await self._release_lock()  # a pass run by hand keeps nothing

    async def _relay_connection(self) -> AsyncConnection | None:
        """The connection holding this service's relay lock, or None when another replica
        holds it (one relay per service, or replicas would interleave an aggregate). The
        lock is a session-level advisory lock, taken once and kept while the relay loop runs
        (saving two round trips a pass): the server frees it when the connection ends, so a
        crashed relay hands over."""
        loop = asyncio.get_running_loop()
        if self._lock is None and loop.time() >= self._next_lock_attempt:
            connection = await self.db.engine.connect()
            try:
                # Autocommit: each statement of a pass is one round trip, no BEGIN/COMMIT.
                await connection.execution_options(isolation_level="AUTOCOMMIT")
                held = await connection.scalar(
                    text("SELECT pg_try_advisory_lock(hashtext(:key))"), {"key": self._lock_key}
                )
            except BaseException:
                await connection.close()
                raise
            if held:
                self._lock = connection
            else:
                await connection.close()
                self._next_lock_attempt = loop.time() + self.poll_interval
        return self._lock

    async def _release_lock(self) -> None:
        if self._lock is None:
            return
        try:
            await self._lock.execute(
                text("SELECT pg_advisory_unlock(hashtext(:key))"), {"key": self._lock_key}
            )
            await self._lock.close()
        except Exception:
            log.warning("outbox relay lock not released cleanly", exc_info=True)
            await self._drop_lock()
        self._lock = None

    async def _drop_lock(self) -> None:
        """Close the lock's connection for good (not back to the pool, which would keep the
        lock): the server frees the lock."""
        lock, self._lock = self._lock, None
        if lock is not None:
            with contextlib.suppress(Exception):
                await lock.invalidate()
            with contextlib.suppress(Exception):
                await lock.close()

    @property
    def _lock_key(self) -> str:
        return f"c4c-outbox:{self.db.schema}"

    async def _publish_pending(self, connect: Connect) -> RelayPass:
        """One pass; ``connect`` gives the connection for each step, none is held while
        publishing (SQLite has one, and the in-process bus may need it to deliver)."""
        async with connect() as connection:
            rows = await self._read_pending(connection)
        if not rows:
            OUTBOX_BACKLOG.labels(self.service).set(0)
            return RelayPass(0, 0)

        # Aggregates go out side by side; within one, strictly in order, stopping at a failure.
        by_subject: dict[str | None, list[tuple[int, str, str, bytes]]] = defaultdict(list)
        for row_id, subject, event_id, type, body in rows:
            by_subject[subject].append((row_id, event_id, type, body))
        groups = deque(by_subject.values())
        published: list[int] = []
        failed: dict[int, str] = {}

        async def send() -> None:
            while groups:
                for row_id, event_id, type, body in groups.popleft():
                    try:
                        # The row's bytes as they are, not a model made from them and
                        # encoded again (more than half of the relay's CPU per event); what
                        # the bus routes and counts by comes from the row's columns.
                        await self.bus.publish_encoded(
                            body, event_id=event_id, type=type, source=self._source
                        )
                    except Exception as exc:
                        failed[row_id] = repr(exc)[:2000]
                        break
                    published.append(row_id)

        # Up to PUBLISHERS publishers take the aggregates in turn, each an aggregate's
        # events in order: enough in flight for the bus, without a task per event (most
        # events are an aggregate of their own, and a pass reads up to batch_size).
        await asyncio.gather(*(send() for _ in range(min(len(groups), PUBLISHERS))))

        async with connect() as connection:
            if published:
                await self._mark_published(connection, published)
            for row_id, error in failed.items():
                await connection.execute(
                    update(OutboxRow)
                    .where(OutboxRow.id == row_id)
                    .values(attempts=OutboxRow.attempts + 1, last_error=error)
                )
            await connection.commit()
            backlog = await self._backlog(connection, rows, failed)
        OUTBOX_BACKLOG.labels(self.service).set(backlog)
        OUTBOX_RELAYED.labels(self.service).inc(len(published))
        if failed:
            log.warning("outbox events not published yet", extra={"count": len(failed)})
        return RelayPass(len(published), len(failed))

    async def _read_pending(self, connection: AsyncConnection) -> Sequence[Any]:
        """Up to ``batch_size`` unpublished events (id, subject, event id, type, body), oldest
        first."""
        if self.db.is_postgres:
            rows = (await connection.execute(self._pending)).all()
            await connection.commit()
            return rows
        return await sqlite_execute(connection, _PENDING_SQLITE, (self.batch_size,))

    async def _mark_published(self, connection: AsyncConnection, ids: list[int]) -> None:
        now = datetime.now(UTC)
        if self.db.is_postgres:  # one array: the same prepared statement whatever the count
            await connection.exec_driver_sql(_MARK_PUBLISHED_POSTGRES, (now, ids))
            return
        convert = sqlite_values(connection.dialect, OutboxRow.__table__, ("published_at",))
        params = (*convert((now,)), orjson.dumps(ids).decode())
        await sqlite_execute(connection, _MARK_PUBLISHED_SQLITE, params)

    async def _backlog(
        self, connection: AsyncConnection, rows: Sequence[Any], failed: dict[int, str]
    ) -> int:
        """Events not published yet. A pass that took fewer rows than it could took all
        there were, so only what failed is left (and what committed since, which woke the
        relay for another pass): counted only while a backlog drains, at most once a second."""
        if len(rows) < self.batch_size:
            return len(failed)
        now = asyncio.get_running_loop().time()
        if now >= self._next_backlog_count:
            self._next_backlog_count = now + 1.0
            count = await connection.scalar(
                select(func.count()).select_from(OutboxRow).where(OutboxRow.published_at.is_(None))
            )
            await connection.commit()
            self._backlog_counted = int(count or 0)
        return self._backlog_counted

    async def prune(self) -> int:
        """Delete published rows older than ``retention``; how many went. No index has
        ``published_at`` (every relay pass would pay for it): the rows that may go are the
        oldest, before the first one created since the cutoff (an event is published after
        it is created), found along the primary key."""
        cutoff = datetime.now(UTC) - self.retention
        old = OutboxRow.published_at < cutoff
        async with self.db.sessions() as session, session.begin():
            first_kept = await session.scalar(
                select(OutboxRow.id)
                .where(OutboxRow.created_at >= cutoff)
                .order_by(OutboxRow.id)
                .limit(1)
            )
            if first_kept is not None:
                old = old & (OutboxRow.id < first_kept)
            result = await session.execute(delete(OutboxRow).where(old))
        return int(getattr(result, "rowcount", 0) or 0)

    async def _prune_now_and_then(self) -> None:
        """Hourly, the published rows and the handled event ids past ``retention``: the
        service's one relay is where its housekeeping runs."""
        now = asyncio.get_running_loop().time()
        if now >= self._next_prune:
            self._next_prune = now + 3600
            pruned = await self.prune()
            forgotten = await prune_processed(self.db, self.retention)
            if pruned or forgotten:
                log.info("outbox pruned", extra={"rows": pruned, "processed_ids": forgotten})

    async def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=f"outbox:{self.service}")

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop relaying after one last pass, so that nothing committed waits for a restart."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout)
            except TimeoutError:
                log.error("outbox relay did not stop in time; the rest goes at next start")
            self._task = None
        await self._release_lock()

    async def _run(self) -> None:
        failures = 0
        while True:
            stopping = self._stopping
            self._wake.clear()
            try:
                result = await self.relay_once()
                await self._prune_now_and_then()
            except Exception:
                log.exception("outbox relay pass failed")
                result = RelayPass(0, 1)
            failures = failures + 1 if result.failed else 0
            if stopping and (result.published == 0 or failures):
                return
            if result.published >= self.batch_size and not failures:
                continue
            wait = self.poll_interval * min(2**failures, 30)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)


@dataclass(frozen=True)
class RelayPass:
    published: int
    failed: int


@event.listens_for(Session, "after_commit")
def _wake_relay(session: Session) -> None:
    outbox = session.info.pop("c4c_outbox", None)
    if isinstance(outbox, Outbox):
        outbox.wake()


@event.listens_for(Session, "after_rollback")
def _forget_relay(session: Session) -> None:
    session.info.pop("c4c_outbox", None)
