"""Every query of the gateway's tables."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from c4c.gateway.models import ApiKey


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
