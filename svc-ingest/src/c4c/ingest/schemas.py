# ruff: noqa: N815  (Darwin Core term names are mixedCase by standard)
"""Requests and answers of the ingest API, in Darwin Core terms wherever one exists
(https://dwc.tdwg.org/terms/), and the data of the events it consumes.

``eventDate`` is ISO 8601 as Darwin Core allows it: an instant **with** its UTC offset
(``2024-05-03T10:15:00+02:00``), a day (``2024-05-03``), a month (``2024-05``), a year
(``2024``), or an interval of two of those (``2024-05-01/2024-05-15``). It is stored as
written and as the period it covers, ``[start, end)`` in UTC (a day, month or year is taken
in UTC; an instant covers one microsecond). A date filter keeps the observations whose whole
period lies within the range asked for: an observation dated only ``2024`` is not returned
for "May 2024", one dated ``2024-05-03`` is.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal, NamedTuple
from uuid import UUID

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from c4c.shared.text import Storable

FUTURE_TOLERANCE = timedelta(minutes=5)  # clock skew between a phone and us
EARLIEST_YEAR = 1000


class Licence(StrEnum):
    """Creative Commons licences an observation (and its media) may carry."""

    CC0 = "CC0"
    CC_BY = "CC-BY"
    CC_BY_SA = "CC-BY-SA"
    CC_BY_NC = "CC-BY-NC"
    CC_BY_NC_SA = "CC-BY-NC-SA"
    CC_BY_ND = "CC-BY-ND"
    CC_BY_NC_ND = "CC-BY-NC-ND"

    @property
    def uri(self) -> str:
        if self is Licence.CC0:
            return "http://creativecommons.org/publicdomain/zero/1.0/legalcode"
        path = self.value.removeprefix("CC-").lower()
        return f"http://creativecommons.org/licenses/{path}/4.0/legalcode"


class BasisOfRecord(StrEnum):
    HUMAN_OBSERVATION = "HumanObservation"
    MACHINE_OBSERVATION = "MachineObservation"
    MATERIAL_SAMPLE = "MaterialSample"
    LIVING_SPECIMEN = "LivingSpecimen"
    PRESERVED_SPECIMEN = "PreservedSpecimen"
    FOSSIL_SPECIMEN = "FossilSpecimen"
    MATERIAL_CITATION = "MaterialCitation"
    OCCURRENCE = "Occurrence"


class TaxonRank(StrEnum):
    KINGDOM = "kingdom"
    PHYLUM = "phylum"
    CLASS = "class"
    ORDER = "order"
    FAMILY = "family"
    SUBFAMILY = "subfamily"
    TRIBE = "tribe"
    GENUS = "genus"
    SUBGENUS = "subgenus"
    SPECIES = "species"
    SUBSPECIES = "subspecies"
    VARIETY = "variety"
    FORM = "form"


class DegreeOfEstablishment(StrEnum):
    """Darwin Core's vocabulary; ``captive`` and ``cultivated`` mark organisms kept by people."""

    NATIVE = "native"
    CAPTIVE = "captive"
    CULTIVATED = "cultivated"
    RELEASED = "released"
    FAILING = "failing"
    CASUAL = "casual"
    REPRODUCING = "reproducing"
    ESTABLISHED = "established"
    COLONISING = "colonising"
    INVASIVE = "invasive"
    WIDESPREAD_INVASIVE = "widespreadInvasive"


# --- eventDate ------------------------------------------------------------------------------

_PARTIAL = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?$")


class EventPeriod(NamedTuple):  # a tuple, not a model: built for every observation stored
    start: datetime
    end: datetime


def _single_period(text: str) -> tuple[datetime, datetime, str]:
    """``[start, end)`` in UTC and the normal form of one date or instant."""
    try:
        return _checked_single_period(text)
    except OverflowError as exc:  # its offset or its end moves it past year 9999 (or before 1)
        raise ValueError(f"{text!r} is out of the range of dates") from exc


def _checked_single_period(text: str) -> tuple[datetime, datetime, str]:
    if "T" in text:  # an instant, the usual form (never a partial date): no regex
        try:
            instant = datetime.fromisoformat(text)
        except ValueError as exc:
            raise ValueError(f"{text!r} is not an ISO 8601 date and time") from exc
        if instant.tzinfo is None:
            raise ValueError(f"{text!r} has no UTC offset: add Z or ±hh:mm")
        start = instant.astimezone(UTC)
        return start, start + _INSTANT, instant.isoformat().replace("+00:00", "Z")
    match = _PARTIAL.match(text)
    if not match:
        raise ValueError(
            f"{text!r} is not an ISO 8601 date: use YYYY, YYYY-MM, YYYY-MM-DD, "
            "YYYY-MM-DDThh:mm:ss±hh:mm or an interval start/end"
        )
    year, month, day = (int(g) if g else None for g in match.groups())
    assert year is not None
    try:
        if day is not None and month is not None:
            start = datetime(year, month, day, tzinfo=UTC)
            return start, start + timedelta(days=1), text
        if month is not None:
            start = datetime(year, month, 1, tzinfo=UTC)
            after = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
            return start, after, text
        return datetime(year, 1, 1, tzinfo=UTC), datetime(year + 1, 1, 1, tzinfo=UTC), text
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a real date ({exc})") from exc


_INSTANT = timedelta(microseconds=1)


def _period(text: str) -> tuple[EventPeriod, str]:
    """The period an ``eventDate`` covers and its normal form, checked."""
    first, slash, second = text.partition("/")
    start, end, normal = _single_period(first)
    if slash:
        _, end, normal_end = _single_period(second)
        if end <= start:
            raise ValueError(f"the interval {text!r} ends before it starts")
        normal = f"{normal}/{normal_end}"
    if start.year < EARLIEST_YEAR:
        raise ValueError(f"{text!r} is before the year {EARLIEST_YEAR}")
    if start > datetime.now(UTC) + FUTURE_TOLERANCE:
        raise ValueError(f"{text!r} is in the future")
    return EventPeriod(start, end), normal


class _CheckedEventDate(str):
    """An ``eventDate`` as validation leaves it, in its normal form, with the period it
    covers: worked out once (about 5 µs), where storing it needs that period again."""

    period: EventPeriod


def event_period(text: str) -> EventPeriod:
    """The ``[start, end)`` in UTC an ``eventDate`` covers (see the module's docstring)."""
    if isinstance(text, _CheckedEventDate):
        return text.period
    return _period(text)[0]


def _normalise_event_date(value: str) -> str:
    text = value.strip()
    parts = text.split("/")
    if len(parts) > 2 or not all(parts):
        raise ValueError(f"{value!r} is not a date or an interval start/end")
    period, normal = _period(text)
    checked = _CheckedEventDate(normal)
    checked.period = period
    return checked


EventDate = Annotated[str, Field(max_length=80), AfterValidator(_normalise_event_date)]


# --- observations ---------------------------------------------------------------------------

# Text a database can store (no NUL, no lone surrogate): refused here (422), not by the
# database (a 500).
Text = Annotated[Storable, Field(min_length=1, max_length=500)]
ShortText = Annotated[Storable, Field(min_length=1, max_length=200)]


class Measurement(BaseModel):
    """A Darwin Core MeasurementOrFact: odour intensity, water transparency, PM2.5…"""

    model_config = ConfigDict(extra="forbid")

    measurementType: ShortText
    measurementValue: bool | int | float | str
    measurementUnit: Annotated[Storable, Field(max_length=50)] | None = None
    measurementMethod: Text | None = None
    measurementRemarks: Annotated[Storable, Field(max_length=2000)] | None = None

    @field_validator("measurementValue")
    @classmethod
    def _finite(cls, value: bool | int | float | str) -> bool | int | float | str:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("must be a finite number")
        if isinstance(value, str) and not 0 < len(value) <= 500:
            raise ValueError("must be 1 to 500 characters")
        if isinstance(value, str) and "\x00" in value:
            raise ValueError("must not contain NUL characters")
        return value


class ObservationFields(BaseModel):
    """What a client says about an observation (create, and merged by PATCH)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    occurrenceID: Text | None = Field(None, description="A stable URI; unset = urn:uuid:<id>.")
    datasetID: ShortText = Field(description="The project / observatory it belongs to.")
    recordedBy: ShortText = Field(description="The user who made the observation.")
    eventDate: EventDate = Field(examples=["2024-05-03T10:15:00+02:00", "2024-05"])
    decimalLatitude: float | None = Field(
        None,
        ge=-90,
        le=90,
        description="Required unless basisOfRecord is MachineObservation (a camera's "
        "detection may have no position).",
    )
    decimalLongitude: float | None = Field(
        None,
        ge=-180,
        le=180,
        validate_default=True,
        description="Given with decimalLatitude, or not at all.",
    )
    coordinateUncertaintyInMeters: float | None = Field(None, gt=0, le=20_037_509)
    geodeticDatum: Literal["WGS84", "EPSG:4326"] = "WGS84"
    countryCode: Annotated[str, Field(pattern=r"^[A-Za-z]{2}$")] | None = None
    scientificName: Text | None = Field(None, description="The name as submitted (verbatim).")
    taxonRank: TaxonRank | None = None
    vernacularName: Text | None = None
    # After the coordinates (its check reads them); the order of the fields is also that of
    # the idempotency hash (body_hash).
    basisOfRecord: BasisOfRecord = Field(BasisOfRecord.HUMAN_OBSERVATION, validate_default=True)
    individualCount: int | None = Field(None, ge=0, le=1_000_000_000)
    occurrenceStatus: Literal["present", "absent"] = "present"
    license: Licence
    degreeOfEstablishment: DegreeOfEstablishment | None = Field(
        None, description="captive / cultivated for organisms kept by people."
    )
    locationObscured: bool = Field(
        False,
        description="Publish coordinates rounded to 0.1° only, and media without EXIF.",
    )
    occurrenceRemarks: Annotated[Storable, Field(max_length=5000)] | None = None
    measurements: list[Measurement] = Field(default_factory=list, max_length=200)

    @field_validator("countryCode")
    @classmethod
    def _upper(cls, value: str | None) -> str | None:
        return value.upper() if value else value

    @field_validator("decimalLongitude")
    @classmethod
    def _paired(cls, value: float | None, info: ValidationInfo) -> float | None:
        latitude = info.data.get("decimalLatitude", 0.0)  # absent: invalid, reported already
        if (value is None) != (latitude is None):
            raise ValueError("is given with decimalLatitude, or not at all")
        return value

    @field_validator("basisOfRecord")
    @classmethod
    def _located(cls, value: BasisOfRecord, info: ValidationInfo) -> BasisOfRecord:
        if value != BasisOfRecord.MACHINE_OBSERVATION and (
            info.data.get("decimalLatitude", 0.0) is None
            and info.data.get("decimalLongitude", 0.0) is None
        ):
            raise ValueError(
                f"a {value.value} needs decimalLatitude and decimalLongitude "
                "(only a MachineObservation may have no position)"
            )
        return value


class ObservationCreate(ObservationFields):
    id: UUID | None = Field(
        None, description="The client's own id: a retry with the same id is safe."
    )


class ObservationPatch(BaseModel):
    """A JSON merge patch (RFC 7396) of :class:`ObservationFields`; null removes a value."""

    model_config = ConfigDict(extra="allow")


class Identification(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    identifiedBy: ShortText
    scientificName: Text
    taxonRank: TaxonRank | None = None
    vernacularName: Text | None = None
    dateIdentified: datetime | None = Field(None, description="Unset = now.")
    identificationRemarks: Annotated[Storable, Field(max_length=2000)] | None = None

    @field_validator("dateIdentified")
    @classmethod
    def _aware_past(cls, value: datetime | None) -> datetime | None:
        value = _aware(value)
        if value is not None and value > datetime.now(UTC) + FUTURE_TOLERANCE:
            raise ValueError("is in the future")
        return value


class IdentificationOut(BaseModel):
    id: str
    identifiedBy: str
    scientificName: str
    taxonRank: str | None = None
    vernacularName: str | None = None
    dateIdentified: datetime
    identificationRemarks: str | None = None
    kind: Literal["human", "machine"]
    modelVersion: str | None = None
    score: float | None = None


class MediaOut(BaseModel):
    id: str
    url: str | None = Field(description="Null when withheld (obscured location, no copy).")
    type: Literal["image", "video", "audio"]
    format: str
    size: int
    sha256: str
    width: int | None = None
    height: int | None = None
    created: str | None = Field(None, description="Capture time from EXIF, as written.")
    exifLatitude: float | None = None
    exifLongitude: float | None = None
    uploadedAt: datetime


class Quality(BaseModel):
    score: float | None = None
    grade: str | None = None
    flags: list[Any] = Field(default_factory=list)
    assessedAt: datetime | None = None


class Observation(ObservationFields):
    """An observation as published. With ``locationObscured`` the coordinates are rounded
    to 0.1° and ``dataGeneralizations`` says so."""

    model_config = ConfigDict(extra="ignore")

    id: str
    occurrenceID: str
    eventDate: str  # as stored; validated on the way in
    dataGeneralizations: str | None = None
    version: int
    createdAt: datetime
    updatedAt: datetime
    deleted: bool = False
    quality: Quality = Field(default_factory=Quality)
    bestMachineIdentification: dict[str, Any] | None = None
    identifications: list[IdentificationOut] = Field(default_factory=list)
    media: list[MediaOut] = Field(default_factory=list)


class ObservationPage(BaseModel):
    items: list[Observation]
    next: str | None = Field(None, description="Cursor of the next page; null at the end.")


class BatchOutcome(BaseModel):
    index: int
    status: Literal["created", "duplicate", "error"]
    id: str | None = None
    location: str | None = None
    problem: dict[str, Any] | None = None


class BatchResult(BaseModel):
    created: int
    duplicates: int
    errors: int
    items: list[BatchOutcome]


# --- listing filters ------------------------------------------------------------------------

Sort = Literal["created", "-created", "eventDate", "-eventDate", "updated", "-updated"]


class BBox(BaseModel):
    min_lon: float = Field(ge=-180, le=180)
    min_lat: float = Field(ge=-90, le=90)
    max_lon: float = Field(ge=-180, le=180)
    max_lat: float = Field(ge=-90, le=90)

    @model_validator(mode="after")
    def _ordered(self) -> BBox:
        if self.min_lat > self.max_lat:
            raise ValueError("minLat is above maxLat")
        return self


def _bbox(value: str | None) -> BBox | None:
    if value is None:
        return None
    parts = value.split(",")
    if len(parts) != 4:
        raise ValueError("bbox is minLon,minLat,maxLon,maxLat")
    try:
        numbers = [float(p) for p in parts]
    except ValueError as exc:
        raise ValueError("bbox is four numbers: minLon,minLat,maxLon,maxLat") from exc
    return BBox(min_lon=numbers[0], min_lat=numbers[1], max_lon=numbers[2], max_lat=numbers[3])


def _aware(value: datetime | None) -> datetime | None:
    """The instant in UTC (as the database compares it)."""
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError("needs a UTC offset")
    try:
        return value.astimezone(UTC)
    except OverflowError as exc:
        raise ValueError("is out of the range of dates") from exc


AwareDateTime = Annotated[datetime | None, AfterValidator(_aware)]
DateBound = Annotated[date | datetime | None, Field(union_mode="left_to_right")]


class ObservationFilter(BaseModel):
    """Filters shared by the listing and the exports. ``bbox`` crossing the antimeridian
    has minLon > maxLon."""

    model_config = ConfigDict(extra="forbid")

    project: ShortText | None = Field(None, description="datasetID equals.")
    recordedBy: ShortText | None = None
    name: Annotated[Storable, Field(min_length=1, max_length=200)] | None = Field(
        None, description="Case-insensitive prefix of scientificName or vernacularName."
    )
    bbox: Annotated[str, Field(max_length=200)] | None = Field(
        None, description="minLon,minLat,maxLon,maxLat (WGS84 degrees)."
    )
    eventDateFrom: DateBound = Field(None, description="Period starts at or after this.")
    eventDateTo: DateBound = Field(None, description="Period ends at or before this.")
    qualityGrade: ShortText | None = None
    hasMedia: bool | None = None
    updatedSince: AwareDateTime = None
    includeDeleted: bool = Field(False, description="Also list tombstones (sync clients).")

    @field_validator("bbox")
    @classmethod
    def _valid_bbox(cls, value: str | None) -> str | None:
        _bbox(value)
        return value

    def box(self) -> BBox | None:
        return _bbox(self.bbox)

    @field_validator("eventDateFrom", "eventDateTo")
    @classmethod
    def _bound(cls, value: datetime | date | None, info: ValidationInfo) -> datetime | date | None:
        if isinstance(value, datetime) and value.tzinfo is None:
            raise ValueError("needs a UTC offset (or give a plain date)")
        try:
            _utc_bound(value, end=info.field_name == "eventDateTo")
        except OverflowError as exc:
            raise ValueError("is out of the range of dates") from exc
        return value

    def date_range(self) -> tuple[datetime | None, datetime | None]:
        """``[from, to)`` in UTC; a plain ``eventDateTo`` date includes that whole day."""
        return _utc_bound(self.eventDateFrom, end=False), _utc_bound(self.eventDateTo, end=True)


def _utc_bound(value: datetime | date | None, *, end: bool) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.astimezone(UTC)
    day = datetime(value.year, value.month, value.day, tzinfo=UTC)
    return day + timedelta(days=1) if end else day


class ListQuery(ObservationFilter):
    sort: Sort = "-created"
    limit: int | None = Field(None, ge=1, le=1000)
    cursor: Annotated[str, Field(max_length=500)] | None = None


class ExportQuery(ObservationFilter):
    format: Literal["csv", "geojson", "dwca"] = "csv"


# --- events consumed ------------------------------------------------------------------------

_OBSERVATION_ID = AliasChoices("observation_id", "observationId", "id")


class ObservationScored(BaseModel):
    """``observation.scored`` from svc-quality."""

    model_config = ConfigDict(extra="ignore")

    observation_id: str = Field(validation_alias=_OBSERVATION_ID, max_length=64)
    score: float | None = None
    grade: str | None = Field(None, max_length=50)
    flags: list[Any] = Field(default_factory=list)


class Candidate(BaseModel):
    model_config = ConfigDict(extra="ignore")

    scientificName: str = Field(
        validation_alias=AliasChoices("scientificName", "scientific_name", "name", "species"),
        max_length=500,
    )
    score: float | None = None
    taxonRank: str | None = Field(
        None, validation_alias=AliasChoices("taxonRank", "taxon_rank", "rank")
    )


class ObservationIdentified(BaseModel):
    """``observation.identified`` from svc-plantid: ranked candidates, best first."""

    model_config = ConfigDict(extra="ignore")

    observation_id: str = Field(validation_alias=_OBSERVATION_ID, max_length=64)
    candidates: list[Candidate] = Field(
        default_factory=list, validation_alias=AliasChoices("candidates", "results")
    )
    model_version: str | None = Field(
        None, validation_alias=AliasChoices("model_version", "modelVersion", "model")
    )


class DetectionCreated(BaseModel):
    """``detection.created`` from svc-video (docs/events.md): becomes a MachineObservation.
    Video sends neither a position nor a label; ``started_at`` is null for uploaded jobs
    (then the event's time is used)."""

    model_config = ConfigDict(extra="ignore")

    detection_id: str = Field(
        validation_alias=AliasChoices("detection_id", "detectionId", "id"), max_length=100
    )
    project: str = Field(
        "video", validation_alias=AliasChoices("project", "datasetID"), max_length=200
    )
    stream_id: str | None = Field(
        None, validation_alias=AliasChoices("stream_id", "streamId", "stream"), max_length=100
    )
    job_id: str | None = Field(
        None, validation_alias=AliasChoices("job_id", "jobId"), max_length=100
    )
    start: datetime | None = Field(
        None, validation_alias=AliasChoices("start", "started_at", "time")
    )
    end: datetime | None = Field(None, validation_alias=AliasChoices("end", "ended_at"))
    label: str | None = Field(
        None, validation_alias=AliasChoices("label", "scientificName", "species"), max_length=500
    )
    score: float | None = None
    model_version: str | None = Field(
        None, validation_alias=AliasChoices("model_version", "modelVersion", "model")
    )
    latitude: float | None = Field(
        None, validation_alias=AliasChoices("latitude", "lat"), ge=-90, le=90
    )
    longitude: float | None = Field(
        None, validation_alias=AliasChoices("longitude", "lon"), ge=-180, le=180
    )
    snapshot_url: str | None = Field(
        None, validation_alias=AliasChoices("snapshot_url", "snapshotUrl", "snapshot")
    )
    license: Licence = Licence.CC_BY
    track_id: int | str | None = Field(None, validation_alias=AliasChoices("track_id", "track"))
