"""The outbox relay on PostgreSQL: one relay per service at a time (replicas included), the
lock handed over when its holder stops or its connection dies; events written in bulk with
the caller's transaction; pooled connections the server closed replaced before use."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, text, update

from c4c.shared.bus import CloudEvent, InProcessBus
from c4c.shared.db import Database
from c4c.shared.outbox import Outbox, OutboxRow, event_id_text

pytestmark = pytest.mark.postgres


class RecordingBus(InProcessBus):
    """The in-process bus, remembering what it was asked to publish."""

    def __init__(self) -> None:
        super().__init__()
        self.published: list[CloudEvent] = []
        self.bodies: list[bytes] = []

    async def publish(self, event: CloudEvent) -> None:
        self.published.append(event)

    async def publish_encoded(self, body: bytes, *, event_id: str, type: str, source: str) -> None:
        self.bodies.append(body)
        self.published.append(CloudEvent.from_json(body))


@pytest.fixture
async def replicas(postgres_url: str, postgres_schema: str) -> AsyncIterator[list[Database]]:
    """Two replicas of one service: two engines on the same schema."""
    dbs = [Database(postgres_url, schema=postgres_schema) for _ in range(2)]
    await dbs[0].migrate([])
    yield dbs
    for db in dbs:
        await db.dispose()


async def write(db: Database, outbox: Outbox, n: int, subject: str = "obs/1") -> list[str]:
    async with db.sessions() as session, session.begin():
        return await outbox.add_batch(
            session, "demo.happened", [(subject, {"n": i}) for i in range(n)]
        )


async def test_one_relay_per_service_and_the_other_takes_over_when_it_stops(
    replicas: list[Database], eventually: Any
) -> None:
    buses = [RecordingBus(), RecordingBus()]
    relays = [
        Outbox(db, bus, service="demo", poll_interval=0.05)
        for db, bus in zip(replicas, buses, strict=True)
    ]
    await relays[0].start()

    async def holds_lock() -> bool:
        return relays[0]._lock is not None

    await eventually(holds_lock)
    await relays[1].start()
    first = await write(replicas[0], relays[0], 30)
    first += await write(replicas[1], relays[1], 30)  # written by the other replica
    await eventually(lambda: len(buses[0].published) == 60)
    assert [e.id for e in buses[0].published] == first  # in order, all by the lock holder
    assert buses[1].published == []

    await relays[0].stop()
    second = await write(replicas[1], relays[1], 10)
    await eventually(lambda: [e.id for e in buses[1].published] == second, timeout=10)
    await relays[1].stop()
    assert len(buses[0].published) == 60  # nothing twice


async def test_relay_hands_over_when_its_lock_connection_dies(
    replicas: list[Database], eventually: Any
) -> None:
    buses = [RecordingBus(), RecordingBus()]
    relays = [
        Outbox(db, bus, service="demo", poll_interval=0.05)
        for db, bus in zip(replicas, buses, strict=True)
    ]
    await relays[0].start()

    async def holds_lock() -> bool:
        return relays[0]._lock is not None

    await eventually(holds_lock)
    await relays[1].start()
    holder = relays[0]._lock
    assert holder is not None
    pid = await holder.scalar(text("SELECT pg_backend_pid()"))
    async with replicas[1].engine.connect() as conn:
        await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    ids = await write(replicas[1], relays[1], 5)

    async def all_published_once() -> bool:
        published = [e.id for bus in buses for e in bus.published]
        return sorted(published) == sorted(ids)

    await eventually(all_published_once, timeout=15)
    for relay in relays:
        await relay.stop()
    async with replicas[0].sessions() as session:
        pending = await session.scalar(
            select(func.count()).select_from(OutboxRow).where(OutboxRow.published_at.is_(None))
        )
    assert pending == 0


async def test_a_pass_run_by_hand_keeps_no_lock(replicas: list[Database]) -> None:
    first = Outbox(replicas[0], RecordingBus(), service="demo")
    second_bus = RecordingBus()
    second = Outbox(replicas[1], second_bus, service="demo")
    await write(replicas[0], first, 3)
    assert (await first.relay_once()).published == 3
    await write(replicas[0], first, 2)
    assert (await second.relay_once()).published == 2  # the lock was free again
    assert len(second_bus.published) == 2


async def test_the_relay_sends_each_row_as_it_is_stored(replicas: list[Database]) -> None:
    db = replicas[0]
    bus = RecordingBus()
    outbox = Outbox(db, bus, service="demo")
    await write(db, outbox, 3)
    async with db.sessions() as session:
        stored = list(await session.scalars(select(OutboxRow.body).order_by(OutboxRow.id)))
    assert (await outbox.relay_once()).published == 3
    assert bus.bodies == stored
    assert [e.source for e in bus.published] == ["/c4c/demo"] * 3


async def test_the_relay_reads_an_index_of_the_unpublished_rows_only(
    replicas: list[Database], postgres_schema: str
) -> None:
    db = replicas[0]
    async with db.engine.connect() as conn:
        indexes = dict(
            (
                await conn.execute(
                    text("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = :s"),
                    {"s": postgres_schema},
                )
            ).all()
        )
    assert "ix_c4c_outbox_published_at" not in indexes
    assert indexes["ix_c4c_outbox_unpublished"].endswith("(id) WHERE (published_at IS NULL)")
    outbox = Outbox(db, RecordingBus(), service="demo", retention=timedelta(days=7))
    await write(db, outbox, 3)
    assert (await outbox.relay_once()).published == 3
    await write(db, outbox, 1)
    async with db.sessions() as session, session.begin():  # the first two, long published
        long_ago = datetime.now(UTC) - timedelta(days=9)
        first = select(OutboxRow.id).order_by(OutboxRow.id).limit(2).scalar_subquery()
        await session.execute(
            update(OutboxRow)
            .where(OutboxRow.id.in_(first))
            .values(created_at=long_ago, published_at=long_ago)
        )
    assert await outbox.prune() == 2
    assert (await outbox.relay_once()).published == 1


async def test_a_batch_is_rolled_back_with_its_transaction(replicas: list[Database]) -> None:
    db = replicas[0]
    outbox = Outbox(db, RecordingBus(), service="demo")

    async def failing_request() -> None:
        async with db.sessions() as session, session.begin():
            await outbox.add_batch(session, "demo.lost", [("s", {})])
            raise RuntimeError("the request failed")

    with pytest.raises(RuntimeError):
        await failing_request()
    ids = await write(db, outbox, 4, subject=f"obs/{uuid.uuid4()}")
    async with db.sessions() as session:
        stored = list(await session.scalars(select(OutboxRow.event_id).order_by(OutboxRow.id)))
    assert stored == ids


async def test_pooled_connection_closed_by_the_server_is_replaced(
    replicas: list[Database], eventually: Any
) -> None:
    db, other = replicas
    async with db.engine.connect() as conn:
        pid = await conn.scalar(text("SELECT pg_backend_pid()"))  # back to the pool after
        pooled = (await conn.get_raw_connection()).driver_connection
    async with other.engine.connect() as conn:
        await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})

    await eventually(pooled.is_closed)  # the loop has read the server's goodbye
    async with db.engine.connect() as conn:  # no error: a fresh connection
        assert await conn.scalar(text("SELECT pg_backend_pid()")) != pid


def test_event_ids_are_random_uuids_in_their_usual_text() -> None:
    ids = [event_id_text() for _ in range(1000)]
    assert len(set(ids)) == len(ids)
    for event_id in ids:
        parsed = uuid.UUID(event_id)
        assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)
        assert str(parsed) == event_id
