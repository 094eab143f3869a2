"""The API-key cache: one query however many requests arrive together, a busy key never
waits for the database, and a revocation (by another process, like the CLI) is seen about
``cache_seconds`` later."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from c4c.gateway import repository
from c4c.gateway.app import MIGRATIONS
from c4c.gateway.service import ApiKeys
from c4c.shared.db import Database


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}")
    await database.migrate([MIGRATIONS])
    yield database
    await database.dispose()


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The key hashes looked up in the database, in order."""
    seen: list[str] = []
    look_up = repository.key_by_hash

    async def counted(session: Any, key_hash: str) -> Any:
        seen.append(key_hash)
        return await look_up(session, key_hash)

    monkeypatch.setattr(repository, "key_by_hash", counted)
    return seen


async def test_requests_arriving_together_make_one_query(db: Database, lookups: list[str]) -> None:
    keys = ApiKeys(db, cache_seconds=5, clock=Clock())
    record, secret = await keys.create("busy", ["*"])
    found = await asyncio.gather(*(keys.authenticate(secret) for _ in range(20)))
    assert {r.id if r else None for r in found} == {record.id}
    assert len(lookups) == 1


async def _id(keys: ApiKeys, secret: str) -> str | None:
    record = await keys.authenticate(secret)
    return record.id if record else None


async def test_a_revocation_elsewhere_is_seen_after_the_cache_time(
    db: Database, lookups: list[str], eventually: Callable[..., Any]
) -> None:
    clock = Clock()
    keys = ApiKeys(db, cache_seconds=5, clock=clock)
    record, secret = await keys.create("soon revoked", ["*"])
    assert await _id(keys, secret) == record.id
    assert await ApiKeys(db).revoke(record.id)  # another process: this cache does not know

    clock.now += 4
    assert await _id(keys, secret) == record.id  # still fresh: no query
    assert len(lookups) == 1

    clock.now += 2  # stale: answered at once from the cache, refreshed meanwhile
    assert await _id(keys, secret) == record.id
    await eventually(lambda: len(lookups) == 2 and not keys._lookups)
    assert await keys.authenticate(secret) is None


async def test_a_long_unused_key_is_looked_up_again_before_answering(
    db: Database, lookups: list[str]
) -> None:
    clock = Clock()
    keys = ApiKeys(db, cache_seconds=5, clock=clock)
    record, secret = await keys.create("idle", ["*"])
    assert await _id(keys, secret) == record.id
    assert await ApiKeys(db).revoke(record.id)
    clock.now += 11  # past twice the cache time: too old to answer with
    assert await keys.authenticate(secret) is None
    assert len(lookups) == 2
