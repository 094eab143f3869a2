"""Tables of the plantid service."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class ProjectRow(Base):
    __tablename__ = "plantid_projects"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text)
    gallery_version: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class SpeciesRow(Base):
    __tablename__ = "plantid_species"

    scientific_name: Mapped[str] = mapped_column(String(300), primary_key=True)
    authorship: Mapped[str | None] = mapped_column(String(300))
    genus: Mapped[str | None] = mapped_column(String(200))
    family: Mapped[str | None] = mapped_column(String(200))
    taxon_rank: Mapped[str | None] = mapped_column(String(30))
    common_names: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    gbif_id: Mapped[str | None] = mapped_column(String(30))
    inat_id: Mapped[int | None] = mapped_column(Integer)


class ReferenceRow(Base):
    __tablename__ = "plantid_references"
    __table_args__ = (
        UniqueConstraint("project_id", "sha256", name="uq_plantid_ref_image"),
        # A project's references in the listing's order, by species (plantid_0002).
        Index("ix_plantid_references_listing", "project_id", "scientific_name", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    project_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("plantid_projects.id", ondelete="CASCADE")
    )
    scientific_name: Mapped[str] = mapped_column(
        String(300), ForeignKey("plantid_species.scientific_name")
    )
    organ: Mapped[str] = mapped_column(String(20))
    sha256: Mapped[str] = mapped_column(String(64))
    media_key: Mapped[str] = mapped_column(String(200))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    author: Mapped[str | None] = mapped_column(String(200))
    license: Mapped[str | None] = mapped_column(String(200))
    embedding: Mapped[bytes] = mapped_column(LargeBinary)
    model_version: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ImportRow(Base):
    __tablename__ = "plantid_imports"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    project_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("plantid_projects.id", ondelete="CASCADE")
    )
    format: Mapped[str] = mapped_column(String(20))
    source: Mapped[str] = mapped_column(String(1000))
    status: Mapped[str] = mapped_column(String(20))
    total: Mapped[int] = mapped_column(Integer, default=0)
    done: Mapped[int] = mapped_column(Integer, default=0)
    skipped: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[list[Any]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class IdentificationRow(Base):
    __tablename__ = "plantid_identifications"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(64), index=True)
    observation_id: Mapped[str | None] = mapped_column(String(64), index=True)
    model_version: Mapped[str] = mapped_column(String(100))
    gallery_version: Mapped[str] = mapped_column(String(100))
    rejected: Mapped[bool] = mapped_column(Boolean)
    result: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class QuotaRow(Base):
    __tablename__ = "plantid_quota"

    caller: Mapped[str] = mapped_column(String(64), primary_key=True)
    day: Mapped[str] = mapped_column(String(10), primary_key=True)
    used: Mapped[int] = mapped_column(Integer, default=0)
