"""A project's references are listed (and a species' projects found) along an index in the
listing's order (plantid_0002), never by sorting or reading them all; the species each
project has are counted again only when its gallery changed, since apps list the projects
often and counting reads all their references (295 ms at 300,000)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import insert, text

from c4c.plantid.app import create_app
from c4c.plantid.models import ProjectRow, ReferenceRow, SpeciesRow
from c4c.plantid.repository import Repository
from c4c.plantid.service import PlantidService, SpeciesCounts
from c4c.plantid.settings import PlantidSettings
from c4c.shared.testing import query_plan, statements_sent

NOW = datetime(2026, 11, 24, tzinfo=UTC)
SPECIES = [f"Species {k:02}" for k in range(50)]


def reference(i: int, project: str, species: str) -> dict[str, Any]:
    return {
        "id": f"{project}-{i:05}",
        "project_id": project,
        "scientific_name": species,
        "organ": "leaf",
        "sha256": f"{project}-{i}",
        "media_key": f"{i}.jpg",
        "width": 1,
        "height": 1,
        "embedding": b"",
        "model_version": "m",
        "created_at": NOW + timedelta(seconds=i),
    }


@pytest.fixture
async def app(
    tmp_path: Path, model_cache: Path, database: dict[str, str]
) -> AsyncIterator[FastAPI]:
    settings = PlantidSettings(
        data_dir=tmp_path, model_cache=model_cache, log_level="WARNING", **database
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        projects = [
            {"id": p, "title": p, "gallery_version": 1, "created_at": NOW, "updated_at": NOW}
            for p in ("big", "small")
        ]
        references = [reference(i, "big", SPECIES[i % 50]) for i in range(5000)]
        references += [reference(i, "small", SPECIES[i % 3]) for i in range(30)]
        async with app.state.runtime.db.engine.begin() as conn:
            await conn.execute(insert(ProjectRow), projects)
            await conn.execute(insert(SpeciesRow), [{"scientific_name": s} for s in SPECIES])
            await conn.execute(insert(ReferenceRow), references)
            await conn.execute(text("ANALYZE"))
        yield app


async def test_references_are_listed_along_their_index(app: FastAPI) -> None:
    db = app.state.runtime.db
    async with db.sessions() as session, statements_sent(session) as sent:
        repo = Repository(session)
        every, total = await repo.list_references("big", species=None, limit=20, offset=0)
        one, of_one = await repo.list_references("big", species=SPECIES[7], limit=20, offset=0)
        await repo.bump_galleries_holding(SPECIES[7])
        listed = [[r.id for r in every], [r.id for r in one]]
        await session.rollback()
    assert (total, of_one) == (5000, 100)
    assert listed[0] == [f"big-{i:05}" for i in range(0, 1000, 50)]
    assert listed[1] == [f"big-{i:05}" for i in range(7, 1000, 50)]
    async with db.engine.connect() as conn:
        plans = [await query_plan(conn, sql, parameters) for sql, parameters in sent]
    _, page, count_one, page_one, holding = plans
    for plan in (page, count_one, page_one, holding):
        assert "ix_plantid_references_listing" in plan, plan
    for plan in (page, page_one):
        assert not any(sort in plan for sort in ("Sort", "TEMP B-TREE")), plan


async def test_species_are_counted_again_only_when_a_gallery_changed(app: FastAPI) -> None:
    db, engine = app.state.runtime.db, app.state.plantid_engine

    async def projects() -> tuple[dict[str, int], list[tuple[str, Any]]]:
        async with db.sessions() as session, statements_sent(session) as sent:
            service = PlantidService(Repository(session), engine, engine.settings)
            _, counts = await service.projects()
        return counts, [(sql, p) for sql, p in sent if "count(distinct" in sql.lower()]

    first, counted = await projects()
    assert first == {"big": 50, "small": 3}
    assert len(counted) == 1
    again, counted = await projects()
    assert again == first
    assert counted == []  # nothing changed since
    async with db.sessions() as session, session.begin():
        await session.execute(insert(ReferenceRow), [reference(9999, "small", SPECIES[40])])
        await Repository(session).bump_gallery("small")
    after, counted = await projects()
    assert after == {"big": 50, "small": 4}
    assert len(counted) == 1
    assert "big" not in str(counted[0][1])  # only the changed one counted


async def test_overlapping_listings_each_answer_what_they_read() -> None:
    """A listing waiting on its count while another, which no longer sees a project, ends:
    each answers for its own projects (the first one failed with a KeyError)."""
    counts = SpeciesCounts()
    counting = asyncio.Event()
    go_on = asyncio.Event()

    async def slow(projects: Sequence[str]) -> dict[str, int]:
        counting.set()
        await go_on.wait()
        return dict.fromkeys(projects, 7)

    async def quick(projects: Sequence[str]) -> dict[str, int]:
        return dict.fromkeys(projects, 2)

    assert await counts.of({"gone": 1}, quick) == {"gone": 2}
    first = asyncio.create_task(counts.of({"gone": 1, "new": 1}, slow))  # counts "new" only
    await counting.wait()
    assert await counts.of({"new": 1}, quick) == {"new": 2}  # "gone" was deleted meanwhile
    go_on.set()
    assert await first == {"gone": 2, "new": 7}
