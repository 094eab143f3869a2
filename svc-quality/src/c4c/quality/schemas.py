# ruff: noqa: N815  (Darwin Core term names are mixedCase by standard)
"""Requests and answers of the quality API, and the data of the events it consumes.

An observation to assess is taken as ingest publishes it (Darwin Core terms), leniently:
out-of-range coordinates, impossible dates or unknown vocabularies are what the checks are
for, so they are accepted and flagged; only wrong types, oversized values and text no
database stores (NUL, see ``Storable``) are refused."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from c4c.shared.text import Storable

Short = Annotated[Storable, Field(max_length=200)]
Text = Annotated[Storable, Field(max_length=2000)]


class MediaIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: Short | None = None
    url: Text | None = None
    type: Literal["image", "video", "audio"] | None = None
    format: Short | None = None
    created: Short | None = Field(None, description="EXIF capture time, as ingest gives it.")
    exifLatitude: float | None = None
    exifLongitude: float | None = None


class IdentificationIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    identifiedBy: Short = "anonymous"
    scientificName: Annotated[Storable, Field(min_length=1, max_length=500)]
    kind: Literal["human", "machine"] = "human"
    score: float | None = None


class MeasurementIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    measurementType: Short
    measurementValue: bool | int | float | Annotated[Storable, Field(max_length=500)]
    measurementUnit: Annotated[Storable, Field(max_length=50)] | None = None


class Votes(BaseModel):
    agree: int = Field(0, ge=0, le=1_000_000)
    disagree: int = Field(0, ge=0, le=1_000_000)


class ObservationIn(BaseModel):
    """An observation as ingest represents it (``GET /ingest/v1/observations/{id}``)."""

    model_config = ConfigDict(extra="ignore")

    id: Short | None = None
    version: int | None = Field(None, ge=0)
    datasetID: Short = Field("default", description="The project: picks the rule set.")
    recordedBy: Short | None = None
    eventDate: Annotated[Storable, Field(max_length=100)] | None = None
    decimalLatitude: float | None = None
    decimalLongitude: float | None = None
    coordinateUncertaintyInMeters: float | None = None
    countryCode: Annotated[Storable, Field(max_length=10)] | None = None
    scientificName: Annotated[Storable, Field(max_length=500)] | None = None
    basisOfRecord: Short | None = None
    individualCount: int | float | Short | None = None
    degreeOfEstablishment: Short | None = None
    captive: bool | None = None
    media: list[MediaIn] = Field(default_factory=list, max_length=50)
    identifications: list[IdentificationIn] = Field(default_factory=list, max_length=500)
    measurements: list[MeasurementIn] = Field(default_factory=list, max_length=200)
    qualityVotes: dict[
        Literal["date", "location", "wild", "evidence", "recent", "subject", "needs_id"], Votes
    ] = Field(default_factory=dict, description="Data-quality votes, iNaturalist's metrics.")


class FlagOut(BaseModel):
    code: str
    severity: Literal["info", "warning", "error"]
    message: str
    evidence: dict[str, Any]
    effect: float
    tip: str | None
    check: str


class RuleSetRef(BaseModel):
    project: str
    version: int


class AssessmentOut(BaseModel):
    assessment_id: str | None = Field(None, description="Null for unstored assessments.")
    observation_id: str | None
    observation_version: int | None
    score: float = Field(ge=0, le=100)
    grade: Literal["casual", "needs_id", "research"]
    flags: list[FlagOut]
    community_taxon: dict[str, Any] | None
    ruleset: RuleSetRef
    assessed_at: str


class AssessmentHistory(BaseModel):
    observation_id: str
    latest: AssessmentOut
    history: list[AssessmentOut]


class BatchItemOut(BaseModel):
    index: int
    status: Literal["assessed", "error"]
    assessment: AssessmentOut | None = None
    problem: dict[str, Any] | None = None


class BatchOut(BaseModel):
    items: list[BatchItemOut]


class CheckIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    weight: float = Field(1.0, ge=0, le=10)
    params: dict[Short, bool | int | float | dict[Short, list[float]]] = Field(default_factory=dict)


class RuleSetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checks: dict[Short, CheckIn] = Field(default_factory=dict)
    research_min_score: float = Field(50.0, ge=0, le=100)


class RuleSetOut(RuleSetIn):
    project: str
    version: int
    available_checks: dict[str, dict[str, Any]]


# --- events consumed ------------------------------------------------------------------------

_OBSERVATION_ID = AliasChoices("observation_id", "observationId", "id")


class ObservationChanged(BaseModel):
    """``observation.updated``: the fields that changed; media and identifications added."""

    model_config = ConfigDict(extra="ignore")

    id: Short
    version: int | None = None
    changed: dict[str, Any] = Field(default_factory=dict)


class ObservationDeleted(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: Short


class Candidate(BaseModel):
    model_config = ConfigDict(extra="ignore")

    scientificName: Annotated[Storable, Field(max_length=500)]
    score: float | None = None


class ObservationIdentified(BaseModel):
    model_config = ConfigDict(extra="ignore")

    observation_id: Short = Field(validation_alias=_OBSERVATION_ID)
    rejected: bool = False
    candidates: list[Candidate] = Field(default_factory=list)

    @field_validator("candidates")
    @classmethod
    def _best_first(cls, value: list[Candidate]) -> list[Candidate]:
        return sorted(value, key=lambda c: -(c.score or 0.0))
