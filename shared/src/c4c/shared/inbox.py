"""Idempotent consumers: the id of each event handled is recorded in the same transaction as
the handler's effect, so a redelivered event is a no-op. One event at a time
(:func:`idempotent`), or in batches (:class:`Batcher` with :func:`unhandled` and
:func:`claim`) where one transaction for many events is what keeps up under load."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta

from sqlalchemy import DateTime, Index, String, Table, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from c4c.shared.batching import GroupCommit
from c4c.shared.bus import CloudEvent, Handler
from c4c.shared.db import Database, InfraBase, delete_some
from c4c.shared.metrics import EVENTS_DUPLICATE

log = logging.getLogger("c4c.inbox")

Effect = Callable[[AsyncSession, CloudEvent], Awaitable[None]]
ConsumerOf = Callable[[CloudEvent], str]
"""The idempotency record (consumer name) an event is handled under."""


class ProcessedEvent(InfraBase):
    __tablename__ = "c4c_processed_events"
    # What pruning finds the old ids by (c4c_shared_0003).
    __table_args__ = (Index("ix_c4c_processed_events_processed_at", "processed_at"),)

    consumer: Mapped[str] = mapped_column(String(100), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    processed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class _AlreadyProcessed(Exception):
    pass


def idempotent(db: Database, consumer: str, effect: Effect, *, service: str = "") -> Handler:
    """A bus handler that applies ``effect`` at most once per event id for ``consumer``."""

    async def handle(event: CloudEvent) -> None:
        try:
            async with db.sessions() as session, session.begin():
                if await session.get(ProcessedEvent, (consumer, event.id)) is not None:
                    raise _AlreadyProcessed
                session.add(
                    ProcessedEvent(
                        consumer=consumer, event_id=event.id, processed_at=datetime.now(UTC)
                    )
                )
                try:
                    # Claim the id before the effect: a concurrent duplicate waits here, then fails.
                    await session.flush()
                except IntegrityError as exc:
                    raise _AlreadyProcessed from exc
                await effect(session, event)
        except _AlreadyProcessed:
            EVENTS_DUPLICATE.labels(service, consumer).inc()
            log.info("duplicate event skipped", extra={"event_id": event.id, "consumer": consumer})

    return handle


async def unhandled(
    session: AsyncSession, events: Sequence[CloudEvent], consumer_of: ConsumerOf, *, service: str
) -> list[CloudEvent]:
    """The events of a batch not handled yet, each once, in order; the others are counted as
    duplicates."""
    ids_by_consumer: dict[str, list[str]] = {}
    for e in events:
        ids_by_consumer.setdefault(consumer_of(e), []).append(e.id)
    handled: set[tuple[str, str]] = set()
    for consumer, ids in ids_by_consumer.items():
        query = select(ProcessedEvent.event_id).where(
            ProcessedEvent.consumer == consumer, ProcessedEvent.event_id.in_(ids)
        )
        handled |= {(consumer, id_) for id_ in (await session.execute(query)).scalars()}
    todo: list[CloudEvent] = []
    for event in events:
        key = (consumer_of(event), event.id)
        if key in handled:
            EVENTS_DUPLICATE.labels(service, key[0]).inc()
        else:
            handled.add(key)
            todo.append(event)
    return todo


async def claim(
    session: AsyncSession, events: Sequence[CloudEvent], consumer_of: ConsumerOf
) -> None:
    """Record these events as handled, in the transaction of their effects and before them:
    a concurrent duplicate fails here (and its batch is then handled event by event)."""
    now = datetime.now(UTC)
    session.add_all(
        ProcessedEvent(consumer=consumer_of(e), event_id=e.id, processed_at=now) for e in events
    )
    await session.flush()


class Batcher:
    """Events the bus hands to its concurrent handlers, gathered into batches for
    ``handle_many`` (a :class:`~c4c.shared.batching.GroupCommit`: a batch is taken ``linger``
    seconds after its oldest event came, whatever arrives meanwhile forms the next). Each
    handler returns when its event is handled, or raises what failed it: a batch that fails
    is handled again event by event, so only a bad event goes back to the bus (unless the
    database or the network failed: then every event of the batch does)."""

    def __init__(
        self,
        handle_many: Callable[[Sequence[CloudEvent]], Awaitable[None]],
        *,
        linger: float = 0.0,
        max_items: int = 100,
    ) -> None:
        async def handled(events: Sequence[CloudEvent]) -> list[None]:
            await handle_many(events)
            return [None] * len(events)

        self._batches = GroupCommit(handled, name="events", linger=linger, max_items=max_items)

    async def handle(self, event: CloudEvent) -> None:
        await self._batches.submit(event)


async def prune_processed(db: Database, retention: timedelta, *, batch: int = 5000) -> int:
    """Forget event ids handled longer than ``retention`` ago, ``batch`` rows per short
    transaction (SQLite has one writer); how many went. A duplicate comes from a redelivery
    or an outbox replay, both far shorter than any sane retention."""
    cutoff = datetime.now(UTC) - retention
    table = ProcessedEvent.__table__
    assert isinstance(table, Table)
    oldest = delete_some(table, table.c.processed_at < cutoff, batch, db.engine.dialect.name)
    total = 0
    while True:
        async with db.sessions() as session, session.begin():
            result = await session.execute(oldest)
        pruned = int(getattr(result, "rowcount", 0) or 0)
        total += pruned
        if pruned < batch:
            return total
