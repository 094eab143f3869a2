"""What an assessment reads of the history, on SQLite and PostgreSQL: each taxon's latest
accepted records and each observer's latest measurements, every key limited on its own,
and the observers' counts, kept as snapshots are written; and that both databases read
them through the indexes made for them (a scan would read every record: 14 times slower at
200,000, see bench quality)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import FastAPI
from sqlalchemy import insert, text

from c4c.quality.models import SeenObservation
from c4c.quality.repository import (
    Repository,
    _accepted_records,
    _count_deltas,
    _recent_measurements,
)
from c4c.shared.bus import CloudEvent, new_event
from c4c.shared.testing import query_plan

NOW = datetime(2026, 11, 24, tzinfo=UTC)


def seen(i: int, **overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": f"o{i}",
        "version": 1,
        "project": "p",
        "recorded_by": "ana",
        "taxon": "Quercus ilex",
        "latitude": 41.0,
        "longitude": 2.0,
        "day_of_year": 100,
        "grade": "research",
        "body": {},
        "measurements": [],
        "deleted": False,
        "updated_at": NOW - timedelta(minutes=i),
    }
    return row | overrides


async def write(app: FastAPI, rows: list[dict[str, Any]]) -> None:
    async with app.state.runtime.db.sessions() as session, session.begin():
        await session.execute(insert(SeenObservation), rows)


async def test_each_taxon_gets_its_own_latest_accepted_records(app: FastAPI) -> None:
    await write(
        app,
        [seen(i) for i in range(5)]
        + [seen(10 + i, taxon="Bellis perennis") for i in range(2)]
        + [
            seen(20, grade="needs_id"),  # not accepted
            seen(21, deleted=True),
            seen(22, latitude=None),  # no position
            seen(23, taxon="Pinus pinea", grade="casual"),
        ],
    )
    async with app.state.runtime.db.sessions() as session:
        found = await Repository(session).accepted_records(
            ["Quercus ilex", "Bellis perennis", "Pinus pinea"], 3
        )
        one = await Repository(session).accepted_records(["Quercus ilex"], 2)
    assert [r[0] for r in found["Quercus ilex"]] == ["o0", "o1", "o2"]  # newest first
    assert [r[0] for r in found["Bellis perennis"]] == ["o10", "o11"]
    assert found["Pinus pinea"] == []
    assert found["Quercus ilex"][0] == ("o0", 41.0, 2.0, 100)
    assert [r[0] for r in one["Quercus ilex"]] == ["o0", "o1"]


async def test_each_observer_gets_their_own_latest_measurements_oldest_first(
    app: FastAPI,
) -> None:
    reading = [{"type": "temperature", "value": 20.0, "unit": "Cel"}]
    await write(
        app,
        [seen(i, measurements=reading) for i in range(4)]
        + [seen(10, recorded_by="station", measurements=reading)]
        + [seen(11, recorded_by="station")]  # nothing measured
        + [seen(12, recorded_by="station", measurements=reading, deleted=True)],
    )
    async with app.state.runtime.db.sessions() as session:
        found = await Repository(session).recent_measurements(["ana", "station", "nobody"], 2)
    assert [i for i, _ in found["ana"]] == ["o1", "o0"]
    assert found["station"] == [("o10", reading)]
    assert found["nobody"] == []


def test_count_deltas_move_each_observer_by_what_changed() -> None:
    def row(observer: str | None, grade: str, deleted: bool = False) -> SeenObservation:
        return SeenObservation(recorded_by=observer, grade=grade, deleted=deleted)

    deltas = _count_deltas(
        [row("ana", "needs_id"), row("ana", "research"), row("bob", "research", deleted=True)],
        [row("ana", "research"), row("ana", "research"), row("bob", "casual"), row(None, "x")],
    )
    assert deltas == {"ana": (0, 1), "bob": (1, 0)}
    assert _count_deltas([row("ana", "research")], [row("ana", "research")]) == {}


async def test_observer_counts_follow_creations_changes_and_deletions(
    app: FastAPI,
    observation: Any,
    unique_name: Callable[[str], str],
    eventually: Any,
) -> None:
    bus = app.state.runtime.bus
    versions: dict[str, int] = {}

    async def keep(event: CloudEvent) -> None:
        versions[event.data["observation_id"]] = event.data["observation_version"]

    await bus.subscribe(unique_name("scored"), ["observation.scored"], keep)
    ids = [f"obs-count-{i}" for i in range(3)]
    for id_ in ids:
        body = observation(id=id_, recordedBy="ana")
        await bus.publish(new_event("ingest", "observation.created", body, subject=id_))
    await eventually(lambda: len(versions) == 3, timeout=30)
    moved = {"id": ids[0], "version": 2, "changed": {"recordedBy": "bob"}}
    await bus.publish(new_event("ingest", "observation.updated", moved, subject=ids[0]))
    await eventually(lambda: versions[ids[0]] == 2, timeout=30)
    await bus.publish(new_event("ingest", "observation.deleted", {"id": ids[1]}, subject=ids[1]))
    db = app.state.runtime.db

    async def counts() -> dict[str, tuple[int, int]]:
        async with db.sessions() as session:
            return await Repository(session).observer_counts(["ana", "bob"])

    await eventually(lambda: _equal(counts(), {"ana": (1, 0), "bob": (1, 0)}), timeout=30)
    # Kept counts agree with counting the snapshots themselves.
    async with db.sessions() as session:
        truth = {
            observer: (total, research)
            for observer, total, research in await session.execute(
                text(
                    "SELECT recorded_by, count(*), "
                    "sum(CASE WHEN grade = 'research' THEN 1 ELSE 0 END) FROM observations "
                    "WHERE deleted = false GROUP BY recorded_by"
                )
            )
        }
    assert truth == await counts()


async def _equal(value: Awaitable[Any], expected: Any) -> bool:
    return await value == expected


async def test_history_is_read_through_its_indexes(app: FastAPI) -> None:
    db = app.state.runtime.db
    await write(
        app,
        [
            seen(
                i, recorded_by=f"u{i % 20}", taxon=f"t{i % 50}", grade=("research", "casual")[i % 2]
            )
            for i in range(5000)
        ],
    )
    statements = [
        (_accepted_records(2), {"taxon0": "t1", "taxon1": "t2", "limit": 5}),
        (_recent_measurements(2), {"observer0": "u1", "observer1": "u2", "limit": 5}),
    ]
    async with db.engine.begin() as conn:
        await conn.execute(text("ANALYZE"))
        for statement, parameters in statements:
            plan = await query_plan(conn, statement.params(**parameters))
            wanted = (
                "ix_observations_accepted"
                if statement is statements[0][0]
                else "ix_observations_observer_recent"
            )
            assert plan.count(wanted) == 2, plan


async def test_upgrading_counts_the_observations_already_seen(app: FastAPI) -> None:
    """A database at quality_0002 (no kept counts) gets them from its snapshots."""
    db = app.state.runtime.db
    async with db.engine.begin() as conn:
        await conn.execute(text("DROP TABLE observer_counts"))
        await conn.execute(
            text(
                "CREATE INDEX ix_observations_observer_counts "
                "ON observations (recorded_by, deleted, grade)"
            )
        )
        await conn.execute(text("UPDATE alembic_version SET version_num = 'quality_0002'"))
    await write(
        app,
        [seen(i, grade=("research", "casual")[i % 2]) for i in range(5)]
        + [seen(10, recorded_by="bob", deleted=True), seen(11, recorded_by=None)],
    )
    await db.migrate(["c4c.quality:migrations"])
    async with db.sessions() as session:
        counts = await Repository(session).observer_counts(["ana", "bob"])
    assert counts == {"ana": (5, 3), "bob": (0, 0)}
