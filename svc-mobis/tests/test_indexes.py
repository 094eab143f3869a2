"""What grows without end is read through indexes made for the few rows wanted: a user's
unread notifications (counted with every page of them, marked read), the observations of
deleted accounts still to pseudonymise (every 30 s, past every one forgotten already), and
the refresh tokens old enough to forget. At 300,000 rows on PostgreSQL: 22 ms → 0.06 and
26-35 ms → 0.03 (migrations mobis_0006, mobis_0007)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fastapi import FastAPI
from sqlalchemy import insert, text

from c4c.mobis.models import NotificationRow, OwnedObservationRow, RefreshTokenRow
from c4c.mobis.repository import Repository
from c4c.shared.testing import query_plan, statements_sent

NOW = datetime(2026, 11, 24, tzinfo=UTC)


async def test_unread_notifications_and_pending_pseudonyms_are_read_by_index(
    app: FastAPI,
) -> None:
    db = app.state.runtime.db
    notifications = [
        {
            "user_id": f"u{i % 4}",
            "observation_id": f"o{i}",
            "kind": "scored",
            "data": {},
            "created_at": NOW,
            "read_at": None if i % 500 == 0 else NOW,  # a few unread among many read
        }
        for i in range(6000)
    ]
    observations = [
        {
            "id": f"o{i}",
            "user_id": None,  # a deleted account's: forgotten, but for the last few
            "project": "p",
            "body_hash": "",
            "version": 1,
            "summary": {},
            "pseudonym": "anonymous-1" if i > 5990 else None,
            "confirmed": True,
            "created_at": NOW,
            "updated_at": NOW,
        }
        for i in range(6000)
    ]
    tokens = [
        {
            "id": f"t{i}",
            "family_id": f"f{i % 100}",
            "user_id": f"u{i % 4}",
            "token_hash": f"h{i}",
            "issued_at": NOW,
            "expires_at": NOW + timedelta(minutes=i),  # none a lifetime past expiry
        }
        for i in range(6000)
    ]
    async with db.engine.begin() as conn:
        await conn.execute(insert(NotificationRow), notifications)
        await conn.execute(insert(OwnedObservationRow), observations)
        await conn.execute(insert(RefreshTokenRow), tokens)
        await conn.execute(text("ANALYZE"))
    async with db.sessions() as session, session.begin():
        repo = Repository(session)
        async with statements_sent(session) as sent:
            unread = [n for n in notifications if n["user_id"] == "u0" and not n["read_at"]]
            assert await repo.unread_count("u0") == len(unread) > 0
            await repo.mark_read("u0", 6000, NOW)
            assert len(await repo.awaiting_pseudonym(5)) == 5
            assert await repo.prune_refresh_tokens(NOW - timedelta(days=30), 1000) == 0
        await session.rollback()
    async with db.engine.connect() as conn:
        plans = [await query_plan(conn, sql, parameters) for sql, parameters in sent]
    unread_count, mark_read, awaiting, pruning = plans
    for plan in (unread_count, mark_read):
        assert "ix_notifications_unread" in plan, plan
    assert "ix_owned_awaiting_pseudonym" in awaiting, awaiting
    assert "ix_refresh_tokens_expires_at" in pruning, pruning
