"""Every query of the quality service."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import case, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from c4c.quality.models import AssessmentRow, ImageRow, MachineIdRow, RuleSetRow, SeenObservation


class Repository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    # --- observations seen ------------------------------------------------------------------

    async def seen(
        self, observation_id: str, *, for_update: bool = False
    ) -> SeenObservation | None:
        query = select(SeenObservation).where(SeenObservation.id == observation_id)
        if for_update:
            query = query.with_for_update()
        return (await self.session.execute(query)).scalar_one_or_none()

    async def save_seen(self, row: SeenObservation) -> None:
        await self.session.merge(row)

    async def set_grade(self, observation_id: str, grade: str) -> None:
        await self.session.execute(
            update(SeenObservation).where(SeenObservation.id == observation_id).values(grade=grade)
        )

    async def accepted_records(
        self, taxon: str, exclude_id: str | None, limit: int
    ) -> Sequence[tuple[float, float, int | None]]:
        query = (
            select(SeenObservation.latitude, SeenObservation.longitude, SeenObservation.day_of_year)
            .where(
                SeenObservation.taxon == taxon,
                SeenObservation.grade == "research",
                SeenObservation.deleted.is_(False),
                SeenObservation.latitude.is_not(None),
                SeenObservation.longitude.is_not(None),
            )
            .order_by(SeenObservation.updated_at.desc())
            .limit(limit)
        )
        if exclude_id is not None:
            query = query.where(SeenObservation.id != exclude_id)
        rows = (await self.session.execute(query)).all()
        return [(r[0], r[1], r[2]) for r in rows if r[0] is not None and r[1] is not None]

    async def observer_counts(self, recorded_by: str, exclude_id: str | None) -> tuple[int, int]:
        query = select(
            func.count(),
            func.coalesce(func.sum(case((SeenObservation.grade == "research", 1), else_=0)), 0),
        ).where(SeenObservation.recorded_by == recorded_by, SeenObservation.deleted.is_(False))
        if exclude_id is not None:
            query = query.where(SeenObservation.id != exclude_id)
        total, research = (await self.session.execute(query)).one()
        return int(total), int(research)

    async def recent_measurements(
        self, recorded_by: str, exclude_id: str | None, limit: int
    ) -> Sequence[list[Any]]:
        """The observer's last measurement lists, oldest first."""
        query = (
            select(SeenObservation.measurements)
            .where(
                SeenObservation.recorded_by == recorded_by,
                SeenObservation.measurements != [],
                SeenObservation.deleted.is_(False),
            )
            .order_by(SeenObservation.updated_at.desc())
            .limit(limit)
        )
        if exclude_id is not None:
            query = query.where(SeenObservation.id != exclude_id)
        return list(reversed((await self.session.execute(query)).scalars().all()))

    # --- assessments ------------------------------------------------------------------------

    async def add_assessment(self, row: AssessmentRow) -> None:
        self.session.add(row)

    async def assessments(self, observation_id: str, limit: int) -> Sequence[AssessmentRow]:
        query = (
            select(AssessmentRow)
            .where(AssessmentRow.observation_id == observation_id)
            .order_by(AssessmentRow.created_at.desc(), AssessmentRow.id)
            .limit(limit)
        )
        return (await self.session.execute(query)).scalars().all()

    # --- rule sets --------------------------------------------------------------------------

    async def latest_ruleset(self, project: str) -> RuleSetRow | None:
        query = (
            select(RuleSetRow)
            .where(RuleSetRow.project == project)
            .order_by(RuleSetRow.version.desc())
            .limit(1)
        )
        return (await self.session.execute(query)).scalar_one_or_none()

    async def add_ruleset(self, row: RuleSetRow) -> None:
        self.session.add(row)
        await self.session.flush()

    # --- photos -----------------------------------------------------------------------------

    async def images(self, media_ids: Sequence[str]) -> dict[str, ImageRow]:
        if not media_ids:
            return {}
        query = select(ImageRow).where(ImageRow.media_id.in_(media_ids))
        return {row.media_id: row for row in (await self.session.execute(query)).scalars()}

    async def save_image(self, row: ImageRow) -> None:
        await self.session.merge(row)

    async def images_sharing_a_band(
        self, bands: Sequence[int], exclude_observation: str | None
    ) -> Sequence[ImageRow]:
        query = select(ImageRow).where(
            or_(
                ImageRow.band0 == bands[0],
                ImageRow.band1 == bands[1],
                ImageRow.band2 == bands[2],
                ImageRow.band3 == bands[3],
            )
        )
        if exclude_observation is not None:
            query = query.where(ImageRow.observation_id != exclude_observation)
        return (await self.session.execute(query.limit(200))).scalars().all()

    # --- machine identifications ------------------------------------------------------------

    async def machine_id(self, observation_id: str) -> MachineIdRow | None:
        return await self.session.get(MachineIdRow, observation_id)

    async def save_machine_id(self, row: MachineIdRow) -> None:
        await self.session.merge(row)
