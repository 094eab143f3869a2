"""Every query of the gateway's tables."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Delete, Table, case, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from c4c.gateway.models import ApiKey, RateLimitBucket, RateLimitWindow
from c4c.shared.db import delete_some


def add_key(session: AsyncSession, key: ApiKey) -> None:
    session.add(key)


async def key_by_hash(session: AsyncSession, key_hash: str) -> ApiKey | None:
    result = await session.execute(select(ApiKey).where(ApiKey.key_hash == key_hash))
    return result.scalar_one_or_none()


async def all_keys(session: AsyncSession) -> list[ApiKey]:
    result = await session.execute(select(ApiKey).order_by(ApiKey.created_at, ApiKey.id))
    return list(result.scalars())


async def count_keys(session: AsyncSession) -> int:
    return int(await session.scalar(select(func.count()).select_from(ApiKey)) or 0)


async def revoke_key(session: AsyncSession, key_id: str, when: datetime) -> bool:
    """Revoke an active key; False when there is no such active key."""
    result = await session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=when)
    )
    return bool(getattr(result, "rowcount", 0))


def _insert(session: AsyncSession) -> Any:
    """INSERT … ON CONFLICT DO UPDATE for the session's database (PostgreSQL or SQLite)."""
    return (postgresql if _dialect(session) == "postgresql" else sqlite).insert


def _dialect(session: AsyncSession) -> str:
    return session.get_bind().dialect.name


async def take_token(
    session: AsyncSession, key: str, *, quota: float, rate: float, now: float
) -> tuple[float, bool]:
    """Refill ``key``'s bucket for the time since its last take and take one token if there
    is one, in one atomic statement; the tokens left and whether one was taken."""
    bucket = RateLimitBucket.__table__.c
    elapsed = case((bucket.at < now, now - bucket.at), else_=0.0)
    refilled = bucket.tokens + elapsed * rate
    tokens = case((refilled > quota, quota), else_=refilled)
    statement = (
        _insert(session)(RateLimitBucket)
        .values(key=key, tokens=quota - 1, at=now, allowed=True)
        .on_conflict_do_update(
            index_elements=[bucket.key],
            set_={
                "tokens": case((tokens >= 1, tokens - 1), else_=tokens),
                "at": now,
                "allowed": tokens >= 1,
            },
        )
        .returning(bucket.tokens, bucket.allowed)
    )
    left, allowed = (await session.execute(statement)).one()
    return float(left), bool(allowed)


async def count_request(session: AsyncSession, key: str, *, quota: int, start: int) -> int:
    """Count one request in ``key``'s window that began at ``start`` (a new window starts
    again from 1); the count, capped at ``quota + 1``."""
    window = RateLimitWindow.__table__.c
    statement = (
        _insert(session)(RateLimitWindow)
        .values(key=key, start=start, used=1)
        .on_conflict_do_update(
            index_elements=[window.key],
            set_={
                "used": case(
                    (window.start != start, 1),
                    (window.used > quota, window.used),
                    else_=window.used + 1,
                ),
                "start": start,
            },
        )
        .returning(window.used)
    )
    return int((await session.execute(statement)).scalar_one())


async def prune_buckets(session: AsyncSession, *, idle_before: float, limit: int) -> int:
    """Delete up to ``limit`` buckets last taken from before ``idle_before``; how many."""
    result = await session.execute(idle_buckets(_dialect(session), idle_before, limit))
    return int(getattr(result, "rowcount", 0))


async def prune_windows(session: AsyncSession, *, started_before: int, limit: int) -> int:
    """Delete up to ``limit`` windows that began before ``started_before``; how many."""
    result = await session.execute(ended_windows(_dialect(session), started_before, limit))
    return int(getattr(result, "rowcount", 0))


def idle_buckets(dialect: str, idle_before: float, limit: int) -> Delete:
    table = RateLimitBucket.__table__
    assert isinstance(table, Table)
    return delete_some(table, table.c.at < idle_before, limit, dialect)


def ended_windows(dialect: str, started_before: int, limit: int) -> Delete:
    table = RateLimitWindow.__table__
    assert isinstance(table, Table)
    return delete_some(table, table.c.start < started_before, limit, dialect)
