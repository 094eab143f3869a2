"""Every query of the plantid service."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Integer, Table, bindparam, case, delete, event, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import BindParameter

from c4c.plantid.models import (
    IdentificationRow,
    ImportRow,
    ProjectRow,
    QuotaRow,
    ReferenceRow,
    SpeciesRow,
)

# The statements of every identification, built once: building one costs more than running it.
_ALL_GALLERY_VERSIONS = select(ProjectRow.id, ProjectRow.gallery_version)
_GALLERY_VERSION = _ALL_GALLERY_VERSIONS.where(ProjectRow.id == bindparam("project_id"))


@functools.cache
def _use_quota_statement(dialect: str) -> Any:
    """Count ``quota_amount`` identifications unless that would pass the limit, returning the
    new count (no row: refused, nothing counted)."""
    table = cast(Table, QuotaRow.__table__)
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    amount: BindParameter[int] = bindparam("quota_amount", type_=Integer)
    return (
        insert(table)
        .values(caller=bindparam("quota_caller"), day=bindparam("quota_day"), used=amount)
        .on_conflict_do_update(
            index_elements=["caller", "day"],
            set_={"used": table.c.used + amount},
            where=table.c.used + amount <= bindparam("quota_limit"),
        )
        .returning(table.c.used)
    )


class Repository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    # projects
    async def get_project(self, project_id: str) -> ProjectRow | None:
        return await self.session.get(ProjectRow, project_id)

    async def list_projects(self) -> Sequence[ProjectRow]:
        return (await self.session.scalars(select(ProjectRow).order_by(ProjectRow.id))).all()

    async def add_project(self, row: ProjectRow) -> None:
        self.session.add(row)
        await self.session.flush()

    async def delete_project(self, project_id: str) -> None:
        await self.session.execute(
            delete(ReferenceRow).where(ReferenceRow.project_id == project_id)
        )
        await self.session.execute(delete(ImportRow).where(ImportRow.project_id == project_id))
        await self.session.execute(delete(ProjectRow).where(ProjectRow.id == project_id))

    async def bump_gallery(self, project_id: str) -> None:
        await self.session.execute(
            update(ProjectRow)
            .where(ProjectRow.id == project_id)
            .values(gallery_version=ProjectRow.gallery_version + 1, updated_at=datetime.now(UTC))
        )

    async def bump_galleries_holding(self, scientific_name: str) -> None:
        """A new gallery version for every project with references of this species: their
        cached galleries carry its metadata."""
        holding = select(ReferenceRow.project_id).where(
            ReferenceRow.scientific_name == scientific_name
        )
        await self.session.execute(
            update(ProjectRow)
            .where(ProjectRow.id.in_(holding))
            .values(gallery_version=ProjectRow.gallery_version + 1, updated_at=datetime.now(UTC))
        )

    async def gallery_versions(self, project_id: str | None) -> dict[str, int]:
        """Gallery version by project: of ``project_id``, or of every project when None."""
        if project_id is None:
            rows = await self.session.execute(_ALL_GALLERY_VERSIONS)
        else:
            rows = await self.session.execute(_GALLERY_VERSION, {"project_id": project_id})
        return {row.id: row.gallery_version for row in rows}

    async def species_counts(self, project_ids: Sequence[str]) -> dict[str, int]:
        """How many species each of these projects has references of (none: absent)."""
        if not project_ids:
            return {}
        rows = await self.session.execute(
            select(ReferenceRow.project_id, func.count(func.distinct(ReferenceRow.scientific_name)))
            .where(ReferenceRow.project_id.in_(project_ids))
            .group_by(ReferenceRow.project_id)
        )
        return {project: int(count) for project, count in rows.all()}

    # species
    async def get_species(self, names: Sequence[str]) -> dict[str, SpeciesRow]:
        if not names:
            return {}
        rows = await self.session.scalars(
            select(SpeciesRow).where(SpeciesRow.scientific_name.in_(set(names)))
        )
        return {row.scientific_name: row for row in rows}

    async def save_species(self, row: SpeciesRow) -> None:
        await self.session.merge(row)

    # references
    async def add_reference(self, row: ReferenceRow) -> bool:
        """False when the project already holds this image (same bytes)."""
        table = cast(Table, ReferenceRow.__table__)
        dialect = self.session.get_bind().dialect.name
        insert = pg_insert if dialect == "postgresql" else sqlite_insert
        values = {c.key: getattr(row, c.key) for c in table.columns}
        result = await self.session.execute(
            insert(table)
            .values(**values)
            .on_conflict_do_nothing(index_elements=["project_id", "sha256"])
        )
        return bool(getattr(result, "rowcount", 0))

    async def get_reference(self, reference_id: str) -> ReferenceRow | None:
        return await self.session.get(ReferenceRow, reference_id)

    async def list_references(
        self, project_id: str, *, species: str | None, limit: int, offset: int
    ) -> tuple[Sequence[ReferenceRow], int]:
        query = select(ReferenceRow).where(ReferenceRow.project_id == project_id)
        if species:
            query = query.where(ReferenceRow.scientific_name == species)
        total = await self.session.scalar(select(func.count()).select_from(query.subquery()))
        rows = await self.session.scalars(
            query.order_by(ReferenceRow.scientific_name, ReferenceRow.created_at, ReferenceRow.id)
            .limit(limit)
            .offset(offset)
        )
        return rows.all(), int(total or 0)

    async def gallery_rows(self, project_ids: Sequence[str]) -> Sequence[ReferenceRow]:
        rows = await self.session.scalars(
            select(ReferenceRow)
            .where(ReferenceRow.project_id.in_(project_ids))
            .order_by(ReferenceRow.id)
        )
        return rows.all()

    async def delete_reference(self, reference_id: str) -> None:
        await self.session.execute(delete(ReferenceRow).where(ReferenceRow.id == reference_id))

    async def set_embeddings(self, updates: Sequence[tuple[str, bytes]], model: str) -> None:
        for reference_id, embedding in updates:
            await self.session.execute(
                update(ReferenceRow)
                .where(ReferenceRow.id == reference_id)
                .values(embedding=embedding, model_version=model)
            )

    # imports
    async def add_import(self, row: ImportRow) -> None:
        self.session.add(row)
        await self.session.flush()

    async def get_import(self, import_id: str) -> ImportRow | None:
        return await self.session.get(ImportRow, import_id)

    async def unfinished_imports(self) -> Sequence[ImportRow]:
        rows = await self.session.scalars(
            select(ImportRow).where(ImportRow.status.in_(("queued", "running")))
        )
        return rows.all()

    # identifications
    async def add_identification(self, row: IdentificationRow) -> None:
        self.session.add(row)

    # quota
    async def use_quota(self, caller: str, day: str, limit: int, amount: int = 1) -> int | None:
        """Count ``amount`` identifications for ``caller`` today and return how many it has
        used; None, counting nothing, when fewer than ``amount`` are left of ``limit``."""
        if amount > limit:  # a first insert would store it unchecked
            return None
        statement = _use_quota_statement(self.session.get_bind().dialect.name)
        values = {
            "quota_caller": caller,
            "quota_day": day,
            "quota_limit": limit,
            "quota_amount": amount,
        }
        used = (await self.session.execute(statement, values)).scalar_one_or_none()
        return None if used is None else int(used)

    async def release_quota(self, caller: str, day: str, amount: int) -> None:
        """Give back ``amount`` identifications counted ahead but not used."""
        await self.session.execute(
            update(QuotaRow)
            .where(QuotaRow.caller == caller, QuotaRow.day == day)
            .values(used=case((QuotaRow.used > amount, QuotaRow.used - amount), else_=0))
        )

    async def quota_used(self, caller: str, day: str) -> int:
        row = await self.session.get(QuotaRow, (caller, day))
        return row.used if row else 0

    def on_commit(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once this session's transaction is committed (not if it rolls
        back): what other requests must only learn of once they can read it."""
        event.listen(self.session.sync_session, "after_commit", lambda _: callback(), once=True)
