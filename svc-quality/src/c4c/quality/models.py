"""Tables of the quality service: what it has seen of each observation (a snapshot merged
from events), its assessments, rule sets, photo hashes and machine identifications."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Float, Index, Integer, String, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class QualityBase(DeclarativeBase):
    pass


ACCEPTED = "grade = 'research' AND deleted = false"
"""The accepted records (research grade, not deleted): the outlier checks' references."""


class SeenObservation(QualityBase):
    __tablename__ = "observations"
    # What each assessment reads of an observer's and a taxon's history, so that it costs
    # the same for a newcomer and for a station with 100,000 observations (see
    # migrations quality_0002 and quality_0003 for the figures).
    __table_args__ = (
        Index("ix_observations_observer_recent", "recorded_by", "updated_at"),
        Index(
            "ix_observations_accepted",
            "taxon",
            "updated_at",
            postgresql_where=text(ACCEPTED),
            sqlite_where=text(ACCEPTED),
        ),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    project: Mapped[str] = mapped_column(String(200), index=True)
    recorded_by: Mapped[str | None] = mapped_column(String(200))
    taxon: Mapped[str | None] = mapped_column(String(500))
    latitude: Mapped[float | None] = mapped_column(Float)
    longitude: Mapped[float | None] = mapped_column(Float)
    day_of_year: Mapped[int | None] = mapped_column(Integer)
    grade: Mapped[str | None] = mapped_column(String(20), index=True)
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    measurements: Mapped[list[Any]] = mapped_column(JSON)
    deleted: Mapped[bool] = mapped_column(default=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class ObserverCount(QualityBase):
    """Each observer's observations seen here and how many are research grade, deleted ones
    aside: kept with every snapshot written, so that an assessment reads one row, not
    every observation of its observer."""

    __tablename__ = "observer_counts"

    recorded_by: Mapped[str] = mapped_column(String(200), primary_key=True)
    total: Mapped[int] = mapped_column(Integer)
    research: Mapped[int] = mapped_column(Integer)


class AssessmentRow(QualityBase):
    __tablename__ = "assessments"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    observation_id: Mapped[str] = mapped_column(String(64), index=True)
    observation_version: Mapped[int | None] = mapped_column(Integer)
    score: Mapped[float] = mapped_column(Float)
    grade: Mapped[str] = mapped_column(String(20))
    flags: Mapped[list[Any]] = mapped_column(JSON)
    community_taxon: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    ruleset_project: Mapped[str] = mapped_column(String(200))
    ruleset_version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class RuleSetRow(QualityBase):
    __tablename__ = "rulesets"

    project: Mapped[str] = mapped_column(String(200), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ImageRow(QualityBase):
    """A photo's analysis; its perceptual hash split in four 16-bit bands, indexed, so
    near-duplicates are found by band equality (then checked by Hamming distance)."""

    __tablename__ = "images"

    media_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    observation_id: Mapped[str] = mapped_column(String(64), index=True)
    recorded_by: Mapped[str | None] = mapped_column(String(200))
    facts: Mapped[dict[str, Any]] = mapped_column(JSON)
    phash: Mapped[int | None] = mapped_column(BigInteger)
    band0: Mapped[int | None] = mapped_column(Integer, index=True)
    band1: Mapped[int | None] = mapped_column(Integer, index=True)
    band2: Mapped[int | None] = mapped_column(Integer, index=True)
    band3: Mapped[int | None] = mapped_column(Integer, index=True)


class MachineIdRow(QualityBase):
    __tablename__ = "machine_ids"

    observation_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    identified_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
