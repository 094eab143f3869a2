"""Tables of the ingest service. Timestamps are stored in UTC (SQLite hands them back
naive: the repository puts the zone back)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

Sequence = BigInteger().with_variant(Integer, "sqlite")  # SQLite autoincrements INTEGER only


class IngestBase(DeclarativeBase):
    pass


class ObservationRow(IngestBase):
    __tablename__ = "observations"

    seq: Mapped[int] = mapped_column(Sequence, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(36), unique=True)
    occurrence_id: Mapped[str] = mapped_column(String(500))
    idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True)
    body_hash: Mapped[str] = mapped_column(String(64))
    # Who created it (see ``service.creator_of``): only they may retry it.
    created_by: Mapped[str] = mapped_column(String(300))
    dataset_id: Mapped[str] = mapped_column(String(200), index=True)
    recorded_by: Mapped[str] = mapped_column(String(200), index=True)
    event_date: Mapped[str] = mapped_column(String(80))
    event_start: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    event_end: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    latitude: Mapped[float | None] = mapped_column(Float)  # None: a detection without position
    longitude: Mapped[float | None] = mapped_column(Float)
    coordinate_uncertainty: Mapped[float | None] = mapped_column(Float)
    geodetic_datum: Mapped[str] = mapped_column(String(20))
    country_code: Mapped[str | None] = mapped_column(String(2))
    scientific_name: Mapped[str | None] = mapped_column(String(500))
    scientific_name_lower: Mapped[str | None] = mapped_column(String(500))
    taxon_rank: Mapped[str | None] = mapped_column(String(30))
    vernacular_name: Mapped[str | None] = mapped_column(String(500))
    vernacular_name_lower: Mapped[str | None] = mapped_column(String(500))
    basis_of_record: Mapped[str] = mapped_column(String(40))
    individual_count: Mapped[int | None] = mapped_column(Integer)
    occurrence_status: Mapped[str] = mapped_column(String(10))
    license: Mapped[str] = mapped_column(String(20))
    degree_of_establishment: Mapped[str | None] = mapped_column(String(30))
    location_obscured: Mapped[bool] = mapped_column(Boolean)
    occurrence_remarks: Mapped[str | None] = mapped_column(Text)
    measurements: Mapped[list[Any]] = mapped_column(JSON)
    quality_score: Mapped[float | None] = mapped_column(Float)
    quality_grade: Mapped[str | None] = mapped_column(String(50), index=True)
    quality_flags: Mapped[list[Any] | None] = mapped_column(JSON)
    quality_assessed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    best_identification: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    best_identification_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    media_count: Mapped[int] = mapped_column(Integer, default=0)
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_observations_created", "created_at", "seq"),
        Index("ix_observations_event", "event_start", "seq"),
        Index("ix_observations_updated", "updated_at", "seq"),
        Index("ix_observations_position", "latitude", "longitude"),  # the bbox filter
        # The name filter is a prefix (LIKE 'x%'): on PostgreSQL only pattern ops serve it.
        *(
            Index(f"ix_observations_{c}", c, postgresql_ops={c: "varchar_pattern_ops"})
            for c in ("scientific_name_lower", "vernacular_name_lower")
        ),
    )


class MediaRow(IngestBase):
    __tablename__ = "media"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    observation_id: Mapped[str] = mapped_column(String(36), index=True)
    kind: Mapped[str] = mapped_column(String(10))
    media_type: Mapped[str] = mapped_column(String(100))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str | None] = mapped_column(String(200))
    public_key: Mapped[str | None] = mapped_column(String(200))
    public_sha256: Mapped[str | None] = mapped_column(String(64))
    external_url: Mapped[str | None] = mapped_column(String(2000))
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    taken_at: Mapped[str | None] = mapped_column(String(40))
    exif_latitude: Mapped[float | None] = mapped_column(Float)
    exif_longitude: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class IdentificationRow(IngestBase):
    __tablename__ = "identifications"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    observation_id: Mapped[str] = mapped_column(String(36), index=True)
    identified_by: Mapped[str] = mapped_column(String(200))
    scientific_name: Mapped[str] = mapped_column(String(500))
    taxon_rank: Mapped[str | None] = mapped_column(String(30))
    vernacular_name: Mapped[str | None] = mapped_column(String(500))
    date_identified: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    remarks: Mapped[str | None] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(10))
    model_version: Mapped[str | None] = mapped_column(String(100))
    score: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
