"""Rate limit backends: the database one, shared by replicas, decides like the in-memory
one does for a single process — on SQLite and on PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, insert, select, text

from c4c.gateway._ratelimit import (
    DAY,
    DatabaseBackend,
    InMemoryBackend,
    Policy,
    RateLimitBackend,
    RateLimiter,
)
from c4c.gateway.app import MIGRATIONS
from c4c.gateway.models import RateLimitBucket, RateLimitWindow
from c4c.gateway.repository import ended_windows, idle_buckets
from c4c.shared.db import Database
from c4c.shared.testing import query_plan

BURST = Policy("burst", 3, 3.0)  # 3 tokens, one more each second
NOW = 1_800_000_000.0


@pytest.fixture(params=["sqlite", "postgres"])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    if request.param == "sqlite":
        db = Database(f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}")
    else:
        db = Database(request.getfixturevalue("postgres_url"), schema=f"t_{uuid.uuid4().hex[:12]}")
    await db.migrate([MIGRATIONS])
    try:
        yield db
    finally:
        if db.is_postgres:
            async with db.engine.begin() as conn:
                await conn.execute(text(f'DROP SCHEMA IF EXISTS "{db.schema}" CASCADE'))
        await db.dispose()


async def _takes(backend: RateLimitBackend, times: list[float]) -> list[tuple[bool, int, int]]:
    decisions = [await backend.take("bucket:api-key:k1", BURST, NOW + t) for t in times]
    return [(d.allowed, d.remaining, d.retry_after) for d in decisions]


async def test_database_buckets_decide_like_memory(database: Database) -> None:
    times = [0, 0, 0, 0, 0.5, 1.0, 1.0, 10.0]
    expected = await _takes(InMemoryBackend(), times)
    assert [allowed for allowed, _, _ in expected] == [1, 1, 1, 0, 0, 1, 0, 1]  # the model
    assert await _takes(DatabaseBackend(database), times) == expected


async def test_replicas_sharing_the_database_share_one_bucket(database: Database) -> None:
    replicas = [DatabaseBackend(database), DatabaseBackend(database)]
    allowed = [(await replicas[i % 2].take("bucket:user:u1", BURST, NOW)).allowed for i in range(5)]
    assert allowed == [True, True, True, False, False]
    other = await replicas[0].take("bucket:user:u2", BURST, NOW)
    assert other.allowed  # callers have buckets of their own


async def test_replicas_sharing_the_database_share_the_daily_quota(database: Database) -> None:
    limiters = [RateLimiter(DatabaseBackend(database), per_second=0, burst=1) for _ in range(2)]
    answers = [await limiters[i % 2].check("api-key:k2", daily_quota=2, now=NOW) for i in range(4)]
    assert [a[0].allowed for a in answers] == [True, True, False, False]
    assert [a[0].remaining for a in answers] == [1, 0, 0, 0]
    assert answers[-1][0].retry_after > 0
    next_day = await limiters[0].check("api-key:k2", daily_quota=2, now=NOW + DAY)
    assert next_day[0].allowed
    assert next_day[0].remaining == 1


async def _rows(db: Database, table: type[RateLimitBucket] | type[RateLimitWindow]) -> int:
    async with db.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(table)) or 0)


async def test_idle_buckets_are_pruned_a_batch_at_a_time(database: Database) -> None:
    backend = DatabaseBackend(database, prune_batch=2)
    for caller in range(5):
        await backend.take(f"bucket:ip:{caller}", BURST, NOW)
    await backend.take("bucket:ip:0", BURST, NOW + 59)
    assert await _rows(database, RateLimitBucket) == 5
    # Taking never prunes: that is the background's work.
    await backend.take("bucket:ip:new", BURST, NOW + 60)
    assert await _rows(database, RateLimitBucket) == 6
    # Two of the four idle ones a pass (a full batch: more may be left); never ip:0, taken
    # 1 s ago, nor ip:new (their buckets are not full again yet).
    assert await backend.prune(NOW + 60, bucket_window=BURST.window) is True
    assert await _rows(database, RateLimitBucket) == 4
    assert await backend.prune(NOW + 60, bucket_window=BURST.window) is True
    assert await _rows(database, RateLimitBucket) == 2
    assert await backend.prune(NOW + 60, bucket_window=BURST.window) is False  # done
    assert await _rows(database, RateLimitBucket) == 2
    # A pruned bucket is as good as new: its caller gets the whole burst again.
    decisions = [await backend.take("bucket:ip:3", BURST, NOW + 61) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]


async def test_ended_daily_windows_are_pruned(database: Database) -> None:
    backend = DatabaseBackend(database, prune_batch=10)
    daily = Policy("daily", 5, DAY)
    for caller in range(3):
        await backend.count(f"daily:api-key:{caller}", daily, NOW)
    tomorrow = NOW + DAY
    answer = await backend.count("daily:api-key:0", daily, tomorrow)
    assert answer.allowed
    assert answer.remaining == 4  # a new day: counted from zero
    assert await _rows(database, RateLimitWindow) == 3
    assert await backend.prune(tomorrow, bucket_window=BURST.window) is False
    assert await _rows(database, RateLimitWindow) == 1  # yesterday's others are gone


async def test_pruning_deletes_rows_by_their_address(database: Database) -> None:
    """Never by a join over every bucket or window (PostgreSQL planned ``key IN (SELECT key
    … LIMIT n)`` so: 53 ms at 300,000 rows, 3 ms by row address)."""
    dialect = database.engine.dialect.name
    async with database.engine.begin() as conn:
        await conn.execute(
            insert(RateLimitBucket),
            [{"key": f"b{i}", "tokens": 1.0, "at": NOW - i, "allowed": True} for i in range(5000)],
        )
        await conn.execute(
            insert(RateLimitWindow),
            [{"key": f"w{i}", "used": 1, "start": int(NOW) - i} for i in range(5000)],
        )
        await conn.execute(text("ANALYZE"))
        plans = [
            await query_plan(conn, idle_buckets(dialect, NOW - 100, 100)),
            await query_plan(conn, ended_windows(dialect, int(NOW) - 100, 100)),
        ]
    for plan in plans:
        assert ("Tid Scan" in plan) if dialect == "postgresql" else ("rowid=?" in plan), plan


async def test_the_gateway_prunes_in_the_background(
    open_gateway: Callable[..., Any], eventually: Callable[..., Any]
) -> None:
    """With the database backend the gateway prunes on its own, besides requests."""
    async with open_gateway(rate_limit_backend="database", rate_limit_prune_interval=0.05) as (
        app,
        _,
    ):
        db: Database = app.state.runtime.db
        async with db.sessions() as session, session.begin():
            session.add(RateLimitBucket(key="bucket:ip:idle", tokens=0.0, at=0.0, allowed=True))

        async def pruned() -> bool:
            return await _rows(db, RateLimitBucket) == 0

        await eventually(pruned)
