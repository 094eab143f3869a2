"""Every query of the quality service."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from functools import cache, lru_cache
from typing import Any, NamedTuple, cast

from sqlalchemy import (
    CompoundSelect,
    FromClause,
    Integer,
    Select,
    Table,
    bindparam,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from c4c.quality.models import (
    ACCEPTED,
    AssessmentRow,
    ImageRow,
    MachineIdRow,
    ObserverCount,
    QualityBase,
    RuleSetRow,
    SeenObservation,
)
from c4c.shared.db import union_of_limited


class IndexedPhoto(NamedTuple):
    media_id: str
    observation_id: str
    recorded_by: str | None
    phash: int | None


_IMAGES = cast(Table, ImageRow.__table__)
_COUNTS = cast(Table, ObserverCount.__table__)


def _values(row: QualityBase, table: FromClause) -> dict[str, Any]:
    """A row's columns as a statement's parameters."""
    return {column.key: getattr(row, column.key) for column in table.columns}


@cache
def _images_upsert(dialect: str) -> Any:
    """The upsert of photo analyses on ``dialect``, built once: its ``excluded`` columns
    cost, built for every batch, about what the statement's execution does."""
    statement = (pg_insert if dialect == "postgresql" else sqlite_insert)(_IMAGES)
    return statement.on_conflict_do_update(
        index_elements=[_IMAGES.c.media_id],
        set_={c.key: statement.excluded[c.key] for c in _IMAGES.columns if not c.primary_key},
    )


@cache
def _counts_upsert(dialect: str) -> Any:
    """The observers' counts moved by deltas (rows of the observer, total and research
    changes) on ``dialect``, built once (as :func:`_images_upsert`)."""
    statement = (pg_insert if dialect == "postgresql" else sqlite_insert)(_COUNTS)
    return statement.on_conflict_do_update(
        index_elements=[_COUNTS.c.recorded_by],
        set_={
            "total": _COUNTS.c.total + statement.excluded.total,
            "research": _COUNTS.c.research + statement.excluded.research,
        },
    )


def _count_deltas(
    removed: Iterable[SeenObservation], added: Iterable[SeenObservation]
) -> dict[str, tuple[int, int]]:
    """How the observers' (total, research) move when these snapshots are replaced by those
    (deleted ones count for nobody)."""
    deltas: dict[str, tuple[int, int]] = {}
    for sign, rows in ((-1, removed), (1, added)):
        for row in rows:
            if row.recorded_by is not None and not row.deleted:
                total, research = deltas.get(row.recorded_by, (0, 0))
                research += sign if row.grade == "research" else 0
                deltas[row.recorded_by] = (total + sign, research)
    return {observer: delta for observer, delta in deltas.items() if delta != (0, 0)}


@lru_cache(maxsize=128)
def _accepted_records(taxa: int) -> CompoundSelect[Any] | Select[Any]:
    """The most recent accepted records with a position (at most ``limit``) of each of
    ``taxa`` taxa, bound as ``taxon0``, ``taxon1``…: one arm a taxon, each read newest
    first from the partial index of accepted records and stopped at the limit (a window
    over every record of the taxa read them all: 63 ms for a taxon with 50,000). Built
    once for each number of taxa: building costs about what the query does."""
    return union_of_limited(
        [
            select(
                SeenObservation.taxon,
                SeenObservation.id,
                SeenObservation.latitude,
                SeenObservation.longitude,
                SeenObservation.day_of_year,
            )
            .where(
                SeenObservation.taxon == bindparam(f"taxon{k}"),
                text(ACCEPTED),  # as the index says it, so that both databases use it
                SeenObservation.latitude.is_not(None),
                SeenObservation.longitude.is_not(None),
            )
            .order_by(SeenObservation.updated_at.desc())
            .limit(bindparam("limit", type_=Integer))
            for k in range(taxa)
        ]
    )


@lru_cache(maxsize=128)
def _recent_measurements(observers: int) -> CompoundSelect[Any] | Select[Any]:
    """Each of ``observers`` observers' (bound as ``observer0``…) latest (at most
    ``limit``) observations with measurements, newest first from the observer's index, built
    once for each number of observers (as :func:`_accepted_records`)."""
    return union_of_limited(
        [
            select(
                SeenObservation.recorded_by,
                SeenObservation.id,
                SeenObservation.measurements,
                SeenObservation.updated_at,
            )
            .where(
                SeenObservation.recorded_by == bindparam(f"observer{k}"),
                # json has no equality operator in PostgreSQL; both databases have this.
                func.json_array_length(SeenObservation.measurements) > 0,
                SeenObservation.deleted.is_(False),
            )
            .order_by(SeenObservation.updated_at.desc())
            .limit(bindparam("limit", type_=Integer))
            for k in range(observers)
        ]
    )


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

    async def seen_many(
        self, observation_ids: Sequence[str], *, for_update: bool = False
    ) -> dict[str, SeenObservation]:
        if not observation_ids:
            return {}
        query = select(SeenObservation).where(SeenObservation.id.in_(observation_ids))
        if for_update:
            query = query.with_for_update()
        return {row.id: row for row in (await self.session.execute(query)).scalars()}

    async def save_seen_many(
        self, rows: Sequence[SeenObservation], prior: Mapping[str, SeenObservation]
    ) -> None:
        """Snapshots in two statements: those seen before (``prior``: read and locked in this
        transaction) updated, the others inserted (a row another replica inserted meanwhile
        fails the transaction, to be read again, it is not overwritten); their observers'
        counts moved with them."""
        table = SeenObservation.__table__
        # Before the update: it refreshes the prior rows of this session in place.
        deltas = _count_deltas([prior[row.id] for row in rows if row.id in prior], rows)
        old = [_values(row, table) for row in rows if row.id in prior]
        new = [_values(row, table) for row in rows if row.id not in prior]
        if old:
            await self.session.execute(update(SeenObservation), old)
        if new:
            await self.session.execute(insert(SeenObservation), new)
        await self._count(deltas)

    async def delete_seen(self, row: SeenObservation) -> None:
        """Mark a snapshot (read and locked in this transaction) deleted; it no longer counts
        for its observer."""
        deltas = _count_deltas([row], [])
        row.deleted = True
        await self.session.merge(row)
        await self._count(deltas)

    async def _count(self, deltas: Mapping[str, tuple[int, int]]) -> None:
        """Observers' counts moved, in one statement, in the observers' order (two replicas
        moving the same ones wait for each other, never deadlock)."""
        if not deltas:
            return
        values = [
            {"recorded_by": observer, "total": total, "research": research}
            for observer, (total, research) in sorted(deltas.items())
        ]
        dialect = self.session.get_bind().dialect.name
        await self.session.execute(_counts_upsert(dialect), values)

    async def counted(
        self, observation_ids: Sequence[str]
    ) -> dict[str, tuple[str | None, str | None]]:
        """Observer and grade of the observations seen here (not deleted), by id."""
        if not observation_ids:
            return {}
        query = select(
            SeenObservation.id, SeenObservation.recorded_by, SeenObservation.grade
        ).where(SeenObservation.id.in_(observation_ids), SeenObservation.deleted.is_(False))
        return {row[0]: (row[1], row[2]) for row in await self.session.execute(query)}

    async def accepted_records(
        self, taxa: Sequence[str], limit: int
    ) -> dict[str, list[tuple[str, float, float, int | None]]]:
        """Each taxon's most recent research-grade records with a position: (id, latitude,
        longitude, day of year)."""
        if not taxa:
            return {}
        query = _accepted_records(len(taxa))
        parameters: dict[str, Any] = {f"taxon{k}": t for k, t in enumerate(taxa)}
        parameters["limit"] = limit
        found: dict[str, list[tuple[str, float, float, int | None]]] = {t: [] for t in taxa}
        for taxon, id_, latitude, longitude, day in await self.session.execute(query, parameters):
            found[taxon].append((id_, latitude, longitude, day))
        return found

    async def observer_counts(self, observers: Sequence[str]) -> dict[str, tuple[int, int]]:
        """(observations, research grade) of each observer, deleted ones aside."""
        if not observers:
            return {}
        query = select(ObserverCount).where(ObserverCount.recorded_by.in_(observers))
        counts = dict.fromkeys(observers, (0, 0))
        for row in (await self.session.execute(query)).scalars():
            counts[row.recorded_by] = (row.total, row.research)
        return counts

    async def recent_measurements(
        self, observers: Sequence[str], limit: int
    ) -> dict[str, list[tuple[str, list[Any]]]]:
        """Each observer's last ``limit`` measurement lists (observation id, list), oldest
        first."""
        if not observers:
            return {}
        parameters: dict[str, Any] = {f"observer{k}": o for k, o in enumerate(observers)}
        parameters["limit"] = limit
        rows = sorted(
            await self.session.execute(_recent_measurements(len(observers)), parameters),
            key=lambda row: row[3],
        )
        found: dict[str, list[tuple[str, list[Any]]]] = {o: [] for o in observers}
        for observer, id_, measurements, _ in rows:
            found[observer].append((id_, measurements))
        return found

    # --- assessments ------------------------------------------------------------------------

    async def add_assessments(self, rows: Sequence[AssessmentRow]) -> None:
        if rows:
            table = AssessmentRow.__table__
            await self.session.execute(insert(AssessmentRow), [_values(r, table) for r in rows])

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

    async def save_images(self, rows: Sequence[ImageRow]) -> None:
        """Photo analyses inserted or replaced, in one statement (one row per media id: a
        statement may not touch a row twice)."""
        if not rows:
            return
        values = list({row.media_id: _values(row, _IMAGES) for row in rows}.values())
        await self.session.execute(_images_upsert(self.session.get_bind().dialect.name), values)

    async def images_sharing_a_band(
        self, hashes_bands: Sequence[Sequence[int]], limit_each: int
    ) -> list[IndexedPhoto]:
        """Photos that share at least one band with one of the hashes: candidates for
        near-duplicates of any of them, for a whole batch in one query (their hashes and
        owners only: the analyses are not needed, and there may be thousands)."""
        if not hashes_bands:
            return []
        query = select(
            ImageRow.media_id, ImageRow.observation_id, ImageRow.recorded_by, ImageRow.phash
        ).where(
            or_(
                *(
                    column.in_(sorted({bands[i] for bands in hashes_bands}))
                    for i, column in enumerate(
                        (ImageRow.band0, ImageRow.band1, ImageRow.band2, ImageRow.band3)
                    )
                )
            )
        )
        query = query.limit(limit_each * len(hashes_bands))
        return [IndexedPhoto(*row) for row in await self.session.execute(query)]

    # --- machine identifications ------------------------------------------------------------

    async def machine_id(self, observation_id: str) -> MachineIdRow | None:
        return await self.session.get(MachineIdRow, observation_id)

    async def machine_ids(self, observation_ids: Sequence[str]) -> Sequence[MachineIdRow]:
        if not observation_ids:
            return []
        query = select(MachineIdRow).where(MachineIdRow.observation_id.in_(observation_ids))
        return (await self.session.execute(query)).scalars().all()

    async def save_machine_id(self, row: MachineIdRow) -> None:
        await self.session.merge(row)
