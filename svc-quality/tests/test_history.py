"""What an assessment reads of the history, on SQLite and PostgreSQL: each taxon's latest
accepted records and each observer's latest measurements, every key limited on its own,
and the observers' counts; and that both databases read them through the indexes made for
them (a scan would read every record: 14 times slower at 200,000, see bench quality)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import FastAPI
from sqlalchemy import insert, text

from c4c.quality.models import SeenObservation
from c4c.quality.repository import Repository, _accepted_records, _recent_measurements

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
        counts = await Repository(session).observer_counts(["ana", "station", "nobody"])
    assert [i for i, _ in found["ana"]] == ["o1", "o0"]
    assert found["station"] == [("o10", reading)]
    assert found["nobody"] == []
    assert counts == {"ana": (4, 4), "station": (2, 2), "nobody": (0, 0)}


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
            sql = str(
                statement.params(**parameters).compile(
                    dialect=db.engine.dialect, compile_kwargs={"literal_binds": True}
                )
            )
            explain = "EXPLAIN QUERY PLAN " if db.is_sqlite else "EXPLAIN "
            plan = " ".join(str(row[-1]) for row in await conn.execute(text(explain + sql)))
            wanted = (
                "ix_observations_accepted"
                if statement is statements[0][0]
                else "ix_observations_observer_recent"
            )
            assert plan.count(wanted) == 2, plan
