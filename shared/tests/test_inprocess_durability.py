"""The in-process bus keeps nothing across a restart, so it confirms late: an event leaves
the outbox only once every queue has handled or durably parked it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from c4c.shared.bus import BusOptions, CloudEvent, InProcessBus, PublishError, new_event
from c4c.shared.db import Database
from c4c.shared.outbox import Outbox, OutboxRow

FAST = BusOptions(delivery_limit=2, retry_backoff=0.001)


async def test_publish_confirms_only_once_every_queue_has_handled_the_event(eventually) -> None:
    bus = InProcessBus(FAST)
    release = asyncio.Event()
    handled: list[str] = []

    async def slow(event: CloudEvent) -> None:
        await release.wait()
        handled.append(event.id)

    async def quick(event: CloudEvent) -> None:
        handled.append(event.id)

    await bus.subscribe("a", ["x"], slow)
    await bus.subscribe("b", ["x"], quick)
    await bus.start()
    publish = asyncio.create_task(bus.publish(new_event("test", "x", None)))
    await eventually(lambda: len(handled) == 1)  # queue b done, queue a still working
    assert not publish.done()
    release.set()
    await asyncio.wait_for(publish, 5)
    assert len(handled) == 2
    await bus.close(timeout=1)


async def test_dead_letters_survive_a_new_bus(tmp_path: Path) -> None:
    async def fails(event: CloudEvent) -> None:
        raise LookupError("no such taxon")

    first = InProcessBus(FAST, dead_letter_dir=tmp_path)
    await first.subscribe("c4c.quality", ["observation.created"], fails)
    await first.start()
    event = new_event("ingest", "observation.created", {"id": 1})
    await first.publish(event)  # returns once parked
    await first.close(timeout=1)

    parked = await InProcessBus(FAST, dead_letter_dir=tmp_path).dead_letters("c4c.quality")
    assert [(p.event.id, p.attempts) for p in parked] == [(event.id, 2)]
    assert "LookupError: no such taxon" in parked[0].reason


async def test_event_in_hand_at_shutdown_stays_in_the_outbox_for_next_start(
    tmp_path: Path, eventually
) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/svc.db")
    await db.migrate([])
    stuck = asyncio.Event()

    async def never_finishes(event: CloudEvent) -> None:
        stuck.set()
        await asyncio.Event().wait()

    bus = InProcessBus(FAST)
    await bus.subscribe("c4c.mobis", ["observation.scored"], never_finishes)
    await bus.start()
    outbox = Outbox(db, bus, service="quality")
    event = new_event("quality", "observation.scored", {"score": 10}, subject="obs/1")
    async with db.sessions() as session, session.begin():
        outbox.add(session, event)
    relay = asyncio.create_task(outbox.relay_once())
    await eventually(stuck.is_set)
    await bus.close(timeout=0.1)  # the process goes down with the handler mid-way
    result = await relay
    assert (result.published, result.failed) == (0, 1)

    # Next start: a fresh bus, a healthy consumer, the same database.
    received: list[str] = []

    async def healthy(event: CloudEvent) -> None:
        received.append(event.id)

    bus = InProcessBus(FAST)
    await bus.subscribe("c4c.mobis", ["observation.scored"], healthy)
    await bus.start()
    assert (await Outbox(db, bus, service="quality").relay_once()).published == 1
    assert received == [event.id]
    async with db.sessions() as session:
        pending = await session.scalar(
            select(func.count()).select_from(OutboxRow).where(OutboxRow.published_at.is_(None))
        )
    assert pending == 0
    await bus.close(timeout=1)
    await db.dispose()


async def test_publish_after_close_is_refused() -> None:
    bus = InProcessBus(FAST)
    await bus.start()
    await bus.close(timeout=1)
    with pytest.raises(PublishError):
        await bus.publish(new_event("test", "x", None))


async def test_outbox_prunes_only_published_rows_past_retention(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/svc.db")
    await db.migrate([])
    bus = InProcessBus(FAST)
    await bus.start()
    outbox = Outbox(db, bus, service="ingest", retention=timedelta(days=7))
    now = datetime.now(UTC)
    long_ago, week_ago = now - timedelta(days=9), now - timedelta(days=8)
    # (created, published): in id order, as events are written.
    states = {
        "old": (long_ago, week_ago),
        "never published": (long_ago, None),
        "published lately": (long_ago, now - timedelta(days=1)),
        "recent": (now, now),
        "unpublished": (now, None),
    }
    events = {name: new_event("ingest", "x", {"name": name}) for name in states}
    async with db.sessions() as session, session.begin():
        for event in events.values():
            outbox.add(session, event)
    async with db.sessions() as session, session.begin():
        for name, (created_at, published_at) in states.items():
            await session.execute(
                update(OutboxRow)
                .where(OutboxRow.event_id == events[name].id)
                .values(created_at=created_at, published_at=published_at)
            )
    assert await outbox.prune() == 1
    async with db.sessions() as session:
        left = set((await session.scalars(select(OutboxRow.event_id))).all())
    assert left == {events[name].id for name in states if name != "old"}
    async with db.sessions() as session, session.begin():  # everything old: no bound
        await session.execute(update(OutboxRow).values(created_at=long_ago, published_at=week_ago))
    assert await outbox.prune() == 4
    await bus.close(timeout=1)
    await db.dispose()


async def test_a_handler_may_publish_to_its_own_queue_without_deadlock() -> None:
    bus = InProcessBus(BusOptions(prefetch=1))
    seen: list[int] = []

    async def countdown(event: CloudEvent) -> None:
        seen.append(event.data["n"])
        if event.data["n"] > 0:
            await bus.publish(new_event("test", "tick", {"n": event.data["n"] - 1}))

    await bus.subscribe("q", ["tick"], countdown)
    await bus.start()
    await asyncio.wait_for(bus.publish(new_event("test", "tick", {"n": 3})), 5)
    assert await bus.drain(5)
    assert seen == [3, 2, 1, 0]
    await bus.close(timeout=1)
