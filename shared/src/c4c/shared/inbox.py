"""Idempotent consumers: the id of each event handled is recorded in the same transaction as
the handler's effect, so a redelivered event is a no-op."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import DateTime, String, delete, select, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from c4c.shared.bus import CloudEvent, Handler
from c4c.shared.db import Database, InfraBase
from c4c.shared.metrics import EVENTS_DUPLICATE

log = logging.getLogger("c4c.inbox")

Effect = Callable[[AsyncSession, CloudEvent], Awaitable[None]]


class ProcessedEvent(InfraBase):
    __tablename__ = "c4c_processed_events"

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


async def prune_processed(db: Database, retention: timedelta, *, batch: int = 5000) -> int:
    """Forget event ids handled longer than ``retention`` ago, ``batch`` rows per short
    transaction (SQLite has one writer); how many went. A duplicate comes from a redelivery
    or an outbox replay, both far shorter than any sane retention."""
    cutoff = datetime.now(UTC) - retention
    key = tuple_(ProcessedEvent.consumer, ProcessedEvent.event_id)
    oldest = (
        select(ProcessedEvent.consumer, ProcessedEvent.event_id)
        .where(ProcessedEvent.processed_at < cutoff)
        .limit(batch)
    )
    total = 0
    while True:
        async with db.sessions() as session, session.begin():
            result = await session.execute(delete(ProcessedEvent).where(key.in_(oldest)))
        pruned = int(getattr(result, "rowcount", 0) or 0)
        total += pruned
        if pruned < batch:
            return total
