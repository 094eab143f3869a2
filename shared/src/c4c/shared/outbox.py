"""Transactional outbox: an event is written in the same transaction as the data it speaks
of, and a relay publishes it afterwards with confirms, in order per aggregate (subject).
A crash between publish and mark publishes it again: consumers are idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import (
    DateTime,
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

from c4c.shared.bus import CloudEvent, EventBus
from c4c.shared.db import Database, InfraBase
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
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)


class Outbox:
    """Writes events into the caller's transaction and relays them to the bus."""

    def __init__(
        self,
        db: Database,
        bus: EventBus,
        *,
        service: str,
        poll_interval: float = 1.0,
        batch_size: int = 200,
        retention: timedelta = timedelta(days=7),
    ) -> None:
        self.db = db
        self.bus = bus
        self.service = service
        self.poll_interval = poll_interval
        self.batch_size = batch_size
        self.retention = retention
        self._next_prune = 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def add(self, session: AsyncSession, event: CloudEvent) -> None:
        """Queue ``event`` in ``session``'s transaction; the relay sends it once committed."""
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

    def wake(self) -> None:
        self._wake.set()

    async def relay_once(self) -> RelayPass:
        """Publish what is pending, oldest first."""
        async with contextlib.AsyncExitStack() as stack:
            if self.db.is_postgres:
                # One relay per service at a time, or replicas would interleave an aggregate.
                lock = await stack.enter_async_context(self.db.engine.connect())
                held = await lock.scalar(
                    text("SELECT pg_try_advisory_lock(hashtext(:key))"),
                    {"key": f"c4c-outbox:{self.db.schema}"},
                )
                await lock.commit()
                if not held:
                    return RelayPass(0, 0)
                stack.push_async_callback(self._unlock, lock)
            return await self._publish_pending()

    async def _unlock(self, lock: AsyncConnection) -> None:
        await lock.execute(
            text("SELECT pg_advisory_unlock(hashtext(:key))"),
            {"key": f"c4c-outbox:{self.db.schema}"},
        )
        await lock.commit()

    async def _publish_pending(self) -> RelayPass:
        async with self.db.sessions() as session:
            rows = (
                await session.execute(
                    select(OutboxRow.id, OutboxRow.subject, OutboxRow.body)
                    .where(OutboxRow.published_at.is_(None))
                    .order_by(OutboxRow.id)
                    .limit(self.batch_size)
                )
            ).all()
            await session.commit()
        if not rows:
            OUTBOX_BACKLOG.labels(self.service).set(0)
            return RelayPass(0, 0)

        # Aggregates go out side by side; within one, strictly in order, stopping at a failure.
        by_subject: dict[str | None, list[tuple[int, bytes]]] = defaultdict(list)
        for row_id, subject, body in rows:
            by_subject[subject].append((row_id, body))
        published: list[int] = []
        failed: dict[int, str] = {}

        async def send(group: list[tuple[int, bytes]]) -> None:
            for row_id, body in group:
                try:
                    await self.bus.publish(CloudEvent.from_json(body))
                except Exception as exc:
                    failed[row_id] = repr(exc)[:2000]
                    return
                published.append(row_id)

        await asyncio.gather(*(send(group) for group in by_subject.values()))

        async with self.db.sessions() as session, session.begin():
            now = datetime.now(UTC)
            if published:
                await session.execute(
                    update(OutboxRow).where(OutboxRow.id.in_(published)).values(published_at=now)
                )
            for row_id, error in failed.items():
                await session.execute(
                    update(OutboxRow)
                    .where(OutboxRow.id == row_id)
                    .values(attempts=OutboxRow.attempts + 1, last_error=error)
                )
            backlog = await session.scalar(
                select(func.count()).select_from(OutboxRow).where(OutboxRow.published_at.is_(None))
            )
        OUTBOX_BACKLOG.labels(self.service).set(backlog or 0)
        OUTBOX_RELAYED.labels(self.service).inc(len(published))
        if failed:
            log.warning("outbox events not published yet", extra={"count": len(failed)})
        return RelayPass(len(published), len(failed))

    async def prune(self) -> int:
        """Delete published rows older than ``retention``; how many went."""
        cutoff = datetime.now(UTC) - self.retention
        async with self.db.sessions() as session, session.begin():
            result = await session.execute(delete(OutboxRow).where(OutboxRow.published_at < cutoff))
        return int(getattr(result, "rowcount", 0) or 0)

    async def _prune_now_and_then(self) -> None:
        now = asyncio.get_running_loop().time()
        if now >= self._next_prune:
            self._next_prune = now + 3600
            pruned = await self.prune()
            if pruned:
                log.info("outbox pruned", extra={"rows": pruned})

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
