"""The typed observation the rules read, the context they are given, and the flags they
raise. Rules are pure: everything they need from the world is in :class:`Context`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol

from c4c.shared.taxonomy import Match, Taxon

Severity = Literal["info", "warning", "error"]
Grade = Literal["casual", "needs_id", "research"]


@dataclass(frozen=True)
class Media:
    id: str | None
    url: str | None
    type: str | None
    format: str | None = None
    exif_taken_at: str | None = None
    exif_latitude: float | None = None
    exif_longitude: float | None = None


@dataclass(frozen=True)
class Identification:
    identified_by: str
    scientific_name: str
    kind: str = "human"
    score: float | None = None


@dataclass(frozen=True)
class Measurement:
    type: str
    value: Any
    unit: str | None


@dataclass(frozen=True)
class Observation:
    id: str | None = None
    version: int | None = None
    project: str | None = None
    recorded_by: str | None = None
    event_date: str | None = None
    latitude: float | None = None
    longitude: float | None = None
    uncertainty_m: float | None = None
    country_code: str | None = None
    scientific_name: str | None = None
    basis_of_record: str | None = None
    individual_count: Any = None
    captive: bool = False
    media: tuple[Media, ...] = ()
    identifications: tuple[Identification, ...] = ()
    measurements: tuple[Measurement, ...] = ()
    quality_votes: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    """Data-quality votes as iNaturalist has them: metric → {"agree": n, "disagree": m}."""


@dataclass(frozen=True)
class ImageFacts:
    """What the image analysis found in one photo (see ``images``)."""

    media_id: str | None
    readable: bool
    error: str | None = None
    width: int = 0
    height: int = 0
    sharpness: float = 0.0
    clipped_highlights: float = 0.0
    clipped_shadows: float = 0.0
    phash: int | None = None
    exif_taken_at: str | None = None
    exif_latitude: float | None = None
    exif_longitude: float | None = None
    """Read from the photo's bytes when the observation did not carry them."""


@dataclass(frozen=True)
class Duplicate:
    media_id: str | None
    other_observation_id: str
    other_media_id: str
    other_recorded_by: str | None
    distance: int
    matches: int = 1
    """How many copies this, the closest, stands for (see ``QualityService._duplicates``)."""


@dataclass(frozen=True)
class TaxonRecords:
    """The suite's accepted (research-grade) records of the observation's taxon."""

    count: int
    nearest_km: float | None
    nearest_days: int | None
    """Circular day-of-year distance to the closest record in season."""


@dataclass(frozen=True)
class ObserverRecord:
    observations: int
    research: int


@dataclass(frozen=True)
class MachineId:
    rejected: bool
    scientific_name: str | None
    score: float | None


class Geography(Protocol):
    def country_at(self, latitude: float, longitude: float) -> str | None: ...

    def in_open_sea(self, latitude: float, longitude: float) -> bool: ...


@dataclass
class Context:
    """The world as the rules see it; the service fills what it knows."""

    now: datetime
    geography: Geography
    taxon_match: Match | None = None
    taxon_of: Callable[[str], Taxon | None] = lambda _: None
    images: tuple[ImageFacts, ...] = ()
    duplicates: tuple[Duplicate, ...] = ()
    taxon_records: TaxonRecords | None = None
    observer: ObserverRecord | None = None
    machine_id: MachineId | None = None
    recent_measurements: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    """The observer's previous values per measurement type (and unit), oldest first."""
    unfetched_media: Mapping[str, str] = field(default_factory=dict)
    """Media URL → why it could not be fetched."""


@dataclass(frozen=True)
class Finding:
    """A rule's verdict before the rule set weighs it."""

    code: str
    severity: Severity
    message: str
    evidence: Mapping[str, Any]
    penalty: float
    tip: str | None = None


@dataclass(frozen=True)
class Flag:
    code: str
    severity: Severity
    message: str
    evidence: Mapping[str, Any]
    effect: float
    tip: str | None
    check: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "severity": self.severity,
            "message": self.message,
            "evidence": dict(self.evidence),
            "effect": self.effect,
            "tip": self.tip,
            "check": self.check,
        }
