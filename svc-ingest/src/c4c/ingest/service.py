"""The ingest domain: idempotent creation, validation beyond the schemas, the Darwin Core
view of an observation, media checks and write-backs from other services. No HTTP, no SQL:
queries go through :class:`~c4c.ingest.repository.Repository`, events through an
:class:`EventSink` (the outbox, in the caller's transaction)."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from io import BytesIO
from typing import Any, BinaryIO, Protocol, TypeVar, cast

import anyio
from pydantic import ValidationError

from c4c.ingest import metrics
from c4c.ingest.models import IdentificationRow, MediaRow, ObservationRow
from c4c.ingest.repository import (
    Known,
    MediaFile,
    MediaOwner,
    Repository,
    WriteBackState,
    utc,
)
from c4c.ingest.schemas import (
    DetectionCreated,
    Identification,
    Licence,
    ListQuery,
    ObservationCreate,
    ObservationFields,
    ObservationFilter,
    ObservationIdentified,
    ObservationScored,
    event_period,
)
from c4c.ingest.settings import IngestSettings
from c4c.shared.auth import Principal
from c4c.shared.batching import GroupCommit
from c4c.shared.db import as_utc
from c4c.shared.media import (
    KNOWN,
    ImageInfo,
    MediaType,
    probe_image,
    require_type,
    strip_metadata,
)
from c4c.shared.problems import Conflict, NotFound, ProblemError, validation_errors
from c4c.shared.storage import MediaStorage

MEDIA_GROUP = 64
"""Uploads sharing one transaction at most (their checks before, or their rows after)."""
OBSCURED_DECIMALS = 1
OBSCURED_UNCERTAINTY_M = 7900.0  # half-diagonal of a 0.1° cell at the equator, rounded up
OBSCURED_NOTE = "Coordinates rounded to 0.1 degree; media published without EXIF."
CREATED, UPDATED, DELETED = "observation.created", "observation.updated", "observation.deleted"
DETECTION_CREATOR = "service:video"  # the creator of detections' observations, as if it posted


class EventSink(Protocol):
    async def emit(self, type: str, items: Iterable[tuple[str, dict[str, Any]]]) -> None:
        """Events of ``type``, each (subject, data), in the caller's transaction."""


# --- problems -------------------------------------------------------------------------------


class ObservationNotFound(NotFound):
    code, title = "observation-not-found", "No such observation"


class ObservationGone(ProblemError):
    status, code, title = 410, "observation-deleted", "The observation was deleted"


class IdempotencyConflict(Conflict):
    code, title = "idempotency-conflict", "Already used for a different observation"


class MediaNotFound(NotFound):
    code, title = "media-not-found", "No such media"


class MediaConflict(Conflict):
    code, title = "media-conflict", "This media id holds different content"


class MediaWithheld(ProblemError):
    status, code, title = 404, "media-withheld", "Not published: the location is obscured"


class PreconditionFailed(ProblemError):
    status, code, title = 412, "precondition-failed", "The observation has changed"


class PreconditionRequired(ProblemError):
    status, code, title = 428, "precondition-required", "Send If-Match with the ETag you hold"


class InvalidPatch(ProblemError):
    status, code, title = 422, "validation-error", "Your request is not valid"


# --- the Darwin Core view -------------------------------------------------------------------


def body_hash(model: ObservationCreate) -> str:
    """Hash of the canonical (parsed, normalised) request: formatting does not matter."""
    return hashlib.sha256(model.model_dump_json().encode()).hexdigest()


def etag(row: ObservationRow) -> str:
    return f'"{row.version}"'


def _iso(value: datetime | None) -> str | None:
    value = utc(value)
    return value.isoformat().replace("+00:00", "Z") if value else None


def fields_of(row: ObservationRow) -> dict[str, Any]:
    """The client-given fields of a stored observation, exact (not obscured)."""
    return {
        "occurrenceID": row.occurrence_id,
        "datasetID": row.dataset_id,
        "recordedBy": row.recorded_by,
        "eventDate": row.event_date,
        "decimalLatitude": row.latitude,
        "decimalLongitude": row.longitude,
        "coordinateUncertaintyInMeters": row.coordinate_uncertainty,
        "geodeticDatum": row.geodetic_datum,
        "countryCode": row.country_code,
        "scientificName": row.scientific_name,
        "taxonRank": row.taxon_rank,
        "vernacularName": row.vernacular_name,
        "basisOfRecord": row.basis_of_record,
        "individualCount": row.individual_count,
        "occurrenceStatus": row.occurrence_status,
        "license": row.license,
        "degreeOfEstablishment": row.degree_of_establishment,
        "locationObscured": row.location_obscured,
        "occurrenceRemarks": row.occurrence_remarks,
        "measurements": row.measurements or [],
    }


def media_url(public_url: str, media_id: str) -> str:
    return f"{public_url.rstrip('/')}/ingest/v1/media/{media_id}"


def _under(public_url: str, url: str) -> str:
    """An absolute URL; a path (as video sends its keyframes) is under the suite's URL."""
    return public_url.rstrip("/") + url if url.startswith("/") else url


def represent_media(m: MediaRow, public_url: str) -> dict[str, Any]:
    url = m.external_url or (media_url(public_url, m.id) if m.public_key else None)
    return {
        "id": m.id,
        "url": url,
        "type": m.kind,
        "format": m.media_type,
        "size": m.size,
        "sha256": m.sha256,
        "width": m.width,
        "height": m.height,
        "created": m.taken_at,
        "exifLatitude": m.exif_latitude if m.public_key == m.storage_key else None,
        "exifLongitude": m.exif_longitude if m.public_key == m.storage_key else None,
        "uploadedAt": _iso(m.created_at),
    }


def represent_identification(i: IdentificationRow) -> dict[str, Any]:
    return {
        "id": i.id,
        "identifiedBy": i.identified_by,
        "scientificName": i.scientific_name,
        "taxonRank": i.taxon_rank,
        "vernacularName": i.vernacular_name,
        "dateIdentified": _iso(i.date_identified),
        "identificationRemarks": i.remarks,
        "kind": i.kind,
        "modelVersion": i.model_version,
        "score": i.score,
    }


def represent(
    row: ObservationRow,
    media: Sequence[MediaRow],
    identifications: Sequence[IdentificationRow],
    public_url: str,
) -> dict[str, Any]:
    """An observation as published (coordinates generalised when obscured)."""
    out = {"id": row.id, **fields_of(row)}
    if row.location_obscured and row.latitude is not None and row.longitude is not None:
        out["decimalLatitude"] = round(row.latitude, OBSCURED_DECIMALS)
        out["decimalLongitude"] = round(row.longitude, OBSCURED_DECIMALS)
        out["coordinateUncertaintyInMeters"] = max(
            row.coordinate_uncertainty or 0.0, OBSCURED_UNCERTAINTY_M
        )
    out["dataGeneralizations"] = OBSCURED_NOTE if row.location_obscured else None
    out["version"] = row.version
    out["createdAt"] = created = _iso(row.created_at)
    # A new row's two times are one object: written once (1 µs an event of a batch).
    out["updatedAt"] = created if row.updated_at is row.created_at else _iso(row.updated_at)
    out["deleted"] = row.deleted_at is not None
    out["quality"] = {
        "score": row.quality_score,
        "grade": row.quality_grade,
        "flags": row.quality_flags or [],
        "assessedAt": _iso(row.quality_assessed_at),
    }
    out["bestMachineIdentification"] = row.best_identification
    out["identifications"] = [represent_identification(i) for i in identifications]
    out["media"] = [represent_media(m, public_url) for m in media]
    return out


def row_values(model: ObservationFields, *, observation_id: str, when: datetime) -> dict[str, Any]:
    """Column values of an observation's client-given fields."""
    period = event_period(model.eventDate)  # validation's own, not worked out again
    return {
        "occurrence_id": model.occurrenceID or f"urn:uuid:{observation_id}",
        "dataset_id": model.datasetID,
        "recorded_by": model.recordedBy,
        "event_date": model.eventDate,
        "event_start": period.start,
        "event_end": period.end,
        "latitude": model.decimalLatitude,
        "longitude": model.decimalLongitude,
        "coordinate_uncertainty": model.coordinateUncertaintyInMeters,
        "geodetic_datum": model.geodeticDatum,
        "country_code": model.countryCode,
        "scientific_name": model.scientificName,
        "scientific_name_lower": model.scientificName.lower() if model.scientificName else None,
        "taxon_rank": model.taxonRank.value if model.taxonRank else None,
        "vernacular_name": model.vernacularName,
        "vernacular_name_lower": model.vernacularName.lower() if model.vernacularName else None,
        "basis_of_record": model.basisOfRecord.value,
        "individual_count": model.individualCount,
        "occurrence_status": model.occurrenceStatus,
        "license": model.license.value,
        "degree_of_establishment": (
            model.degreeOfEstablishment.value if model.degreeOfEstablishment else None
        ),
        "location_obscured": model.locationObscured,
        "occurrence_remarks": model.occurrenceRemarks,
        "measurements": [m.model_dump(exclude_none=True) for m in model.measurements],
        "updated_at": when,
    }


def new_row(
    model: ObservationCreate,
    *,
    idempotency_key: str | None,
    digest: str,
    creator: str,
    when: datetime,
) -> dict[str, Any]:
    observation_id = str(model.id or uuid.uuid4())
    return {
        "id": observation_id,
        "idempotency_key": idempotency_key,
        "body_hash": digest,
        "created_by": creator,
        **row_values(model, observation_id=observation_id, when=when),
        "quality_flags": None,
        "media_count": 0,
        "version": 1,
        "created_at": when,
        "deleted_at": None,
    }


class _NewRow:
    """The column values of a row being inserted, read as attributes like the stored row
    (what ``represent`` reads): an ORM object per row cost more than all else in a batch.
    A column not given is NULL, as in the table: a class attribute of None each (found by
    the plain look-up, where a ``__getattr__`` for the six missing cost 4 µs an event)."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)


for _column in ObservationRow.__table__.columns:
    setattr(_NewRow, _column.key, None)


def row_from_values(values: dict[str, Any]) -> ObservationRow:
    return cast(ObservationRow, _NewRow(values))


# --- results --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Created:
    observation: dict[str, Any]
    etag: str
    created: bool  # False: a retry of an earlier request, answered the same way


@dataclass(frozen=True)
class BatchItem:
    index: int
    model: ObservationCreate | None
    problem: dict[str, Any] | None = None


def _errors(error: ValidationError) -> list[dict[str, Any]]:
    """Per-field errors, located in the body as for a single request."""
    return validation_errors([{**e, "loc": ("body", *e["loc"])} for e in error.errors()])


def invalid_item(index: int, error: ValidationError) -> BatchItem:
    errors = _errors(error)
    fields = ", ".join(e["field"] or "the item" for e in errors)
    return BatchItem(
        index, None, _problem(422, "validation-error", "Invalid", f"Invalid: {fields}", errors)
    )


def _problem(status: int, code: str, title: str, detail: str, errors: Any = None) -> dict[str, Any]:
    problem: dict[str, Any] = {
        "type": f"urn:c4c:problem:{code}",
        "title": title,
        "status": status,
        "detail": detail,
    }
    if errors is not None:
        problem["errors"] = errors
    return problem


def creator_of(principal: Principal | None) -> str:
    """Who creates, as stored: an id or key is theirs, and only they may retry it. Callers
    without a principal (no gateway in front) are one party; so are anonymous ones, whatever
    their address (a phone retrying changes networks)."""
    if principal is None or principal.kind == "anonymous":
        return "anonymous"
    return f"{principal.kind}:{principal.id}"


def _replay_or_conflict(prior: Known, digest: str, what: str, creator: str) -> None:
    if prior.created_by != creator:
        # Not a replay: answering one would tell a stranger the observation is theirs; nor
        # does it name the observation, whose id a stranger's key would otherwise reveal.
        raise IdempotencyConflict(f"An observation with {what} was created by another client.")
    if prior.deleted:
        raise IdempotencyConflict(
            f"Observation {prior.id} ({what}) was deleted.", observation_id=prior.id
        )
    if prior.body_hash != digest:
        raise IdempotencyConflict(
            f"Observation {prior.id} was created from {what} with a different body.",
            observation_id=prior.id,
        )


# --- the service ----------------------------------------------------------------------------


class IngestService:
    def __init__(
        self,
        repo: Repository,
        events: EventSink,
        settings: IngestSettings,
        storage: MediaStorage | None = None,
    ) -> None:
        self.repo = repo
        self.events = events
        self.settings = settings
        self.storage = storage

    async def _emit(self, type: str, observation_id: str, data: dict[str, Any]) -> None:
        await self.events.emit(type, [(_subject(observation_id), data)])

    def _represent(
        self,
        row: ObservationRow,
        media: Sequence[MediaRow] = (),
        idents: Sequence[IdentificationRow] = (),
    ) -> dict[str, Any]:
        return represent(row, media, idents, self.settings.public_url)

    async def view(self, observation_id: str) -> tuple[dict[str, Any], str]:
        row = await self._alive(observation_id)
        return await self._full(row), etag(row)

    async def _full(self, row: ObservationRow) -> dict[str, Any]:
        media = (await self.repo.media_of([row.id]))[row.id]
        idents = (await self.repo.identifications_of([row.id]))[row.id]
        return self._represent(row, media, idents)

    async def _alive(self, observation_id: str, *, for_update: bool = False) -> ObservationRow:
        return _living(observation_id, await self.repo.get(observation_id, for_update=for_update))

    # --- create ----------------------------------------------------------------------------

    async def create(
        self, model: ObservationCreate, idempotency_key: str | None, creator: str
    ) -> Created:
        created = (await self.create_many([(model, idempotency_key, creator)]))[0]
        return created or await self.replay(model, idempotency_key, creator)

    async def create_many(
        self, requests: Sequence[tuple[ObservationCreate, str | None, str]]
    ) -> list[Created | None]:
        """Store new observations together, each with its event: one outcome per request,
        None where its id or key is taken (by an earlier or a concurrent request: see
        :meth:`replay`). The requests' ids and keys must differ from one another."""
        when = datetime.now(UTC)
        rows = [
            new_row(model, idempotency_key=key, digest=body_hash(model), creator=creator, when=when)
            for model, key, creator in requests
        ]
        inserted = await self.repo.insert_many(rows)
        stored = [values for values in rows if values["id"] in inserted]
        metrics.observations_created((v["dataset_id"], v["basis_of_record"]) for v in stored)
        created = {v["id"]: self._represent(row_from_values(v)) for v in stored}
        await self.events.emit(CREATED, ((_subject(i), o) for i, o in created.items()))
        return [
            Created(created[v["id"]], f'"{v["version"]}"', created=True)
            if v["id"] in created
            else None
            for v in rows
        ]

    async def replay(
        self, model: ObservationCreate, idempotency_key: str | None, creator: str
    ) -> Created:
        """The answer to a create whose id or key is taken: a retry by its creator is
        answered as the first time; a different body or another creator is a conflict."""
        ids = [str(model.id)] if model.id else []
        known = await self.repo.known(ids=ids, idempotency_key=idempotency_key)
        prior = known.get(ids[0]) if ids else None
        what = "this id"
        if prior is None and idempotency_key is not None:
            prior, what = known.get(f"key:{idempotency_key}"), "this Idempotency-Key"
        if prior is None:  # pragma: no cover - the winner's row must be visible by now
            raise IdempotencyConflict("A concurrent request is creating this observation.")
        _replay_or_conflict(prior, body_hash(model), what, creator)
        row = await self._alive(prior.id)
        return Created(await self._full(row), etag(row), created=False)

    async def create_batch(self, items: Sequence[BatchItem], creator: str) -> list[dict[str, Any]]:
        """Per-item outcomes; valid new items are stored together, whatever the others.
        Inserted first, looked up after: only the items whose id is taken (a retry, a
        conflict, a concurrent batch) cost a query more."""
        when = datetime.now(UTC)
        outcomes: list[dict[str, Any]] = []
        rows: list[dict[str, Any]] = []
        positions: dict[str, int] = {}  # id of a new row -> its outcome
        repeats: list[tuple[int, str, str]] = []  # (outcome, id, digest): an id seen before
        for item in items:
            if item.model is None:
                outcomes.append({"index": item.index, "status": "error", "problem": item.problem})
                continue
            digest = body_hash(item.model)
            item_id = str(item.model.id) if item.model.id else None
            if item_id in positions:
                repeats.append((len(outcomes), item_id, digest))
                outcomes.append({"index": item.index})  # settled once the first is
                continue
            values = new_row(
                item.model, idempotency_key=None, digest=digest, creator=creator, when=when
            )
            rows.append(values)
            positions[values["id"]] = len(outcomes)
            outcomes.append(self._outcome(item.index, "created", values["id"]))
        inserted = await self.repo.insert_many(rows)
        # Taken before (a retry or a conflict) or concurrently: answered as retries.
        taken = [values for values in rows if values["id"] not in inserted]
        known = await self.repo.known(ids=[values["id"] for values in taken]) if taken else {}
        for values in taken:
            position = positions[values["id"]]
            outcomes[position] = self._existing(
                outcomes[position]["index"], known[values["id"]], values["body_hash"], creator
            )
        for values in rows:
            if values["id"] in inserted:
                known[values["id"]] = Known(values["id"], values["body_hash"], False, creator)
        for position, item_id, digest in repeats:
            outcomes[position] = self._existing(
                outcomes[position]["index"], known[item_id], digest, creator
            )
        stored = [values for values in rows if values["id"] in inserted]
        metrics.observations_created((v["dataset_id"], v["basis_of_record"]) for v in stored)
        await self.events.emit(
            CREATED,
            ((_subject(v["id"]), self._represent(row_from_values(v))) for v in stored),
        )
        return outcomes

    def _existing(self, index: int, prior: Known, digest: str, creator: str) -> dict[str, Any]:
        """The outcome of an item whose id is stored already: a retry or a conflict."""
        try:
            _replay_or_conflict(prior, digest, "this id", creator)
        except IdempotencyConflict as exc:
            return self._error(index, exc, prior.id)
        return self._outcome(index, "duplicate", prior.id)

    def _outcome(self, index: int, status: str, observation_id: str) -> dict[str, Any]:
        location = f"/ingest/v1/observations/{observation_id}"
        return {"index": index, "status": status, "id": observation_id, "location": location}

    @staticmethod
    def _error(index: int, exc: ProblemError, observation_id: str | None) -> dict[str, Any]:
        problem = _problem(exc.status, exc.code, exc.title, str(exc.detail))
        return {"index": index, "status": "error", "id": observation_id, "problem": problem}

    # --- change ----------------------------------------------------------------------------

    async def patch(
        self, observation_id: str, if_match: str | None, patch: dict[str, Any]
    ) -> tuple[dict[str, Any], str]:
        if if_match is None:
            raise PreconditionRequired("PATCH needs If-Match with the observation's ETag.")
        row = await self._alive(observation_id, for_update=True)
        _check_version(row, if_match)
        current = fields_of(row)
        merged = _merge_patch(current, patch)
        try:
            model = ObservationFields.model_validate(merged)
        except ValidationError as exc:
            errors = _errors(exc)
            raise InvalidPatch(
                "Invalid: " + ", ".join(e["field"] or "?" for e in errors), errors=errors
            ) from exc
        when = datetime.now(UTC)
        values = row_values(model, observation_id=row.id, when=when)
        after = model.model_dump(mode="json")
        changed = {k: v for k, v in after.items() if current.get(k) != v}
        if not changed:
            return await self._full(row), etag(row)
        values["version"] = row.version + 1
        await self.repo.update(row.id, values)
        for key, value in values.items():
            setattr(row, key, value)
        full = await self._full(row)
        if "locationObscured" in changed and row.location_obscured:
            await self._publish_media_without_exif(row.id)
            full = await self._full(row)
        public_changes = {k: full[k] for k in changed if k in full}
        if "decimalLatitude" in changed or "locationObscured" in changed:
            for key in ("decimalLatitude", "decimalLongitude", "coordinateUncertaintyInMeters"):
                public_changes[key] = full[key]
        await self._emit(
            UPDATED, row.id, {"id": row.id, "version": row.version, "changed": public_changes}
        )
        return full, etag(row)

    async def delete(self, observation_id: str, if_match: str | None) -> None:
        row = await self._alive(observation_id, for_update=True)
        if if_match is not None:
            _check_version(row, if_match)
        when = datetime.now(UTC)
        await self.repo.update(
            row.id, {"deleted_at": when, "updated_at": when, "version": row.version + 1}
        )
        await self._emit(
            DELETED, row.id, {"id": row.id, "version": row.version + 1, "deletedAt": _iso(when)}
        )

    async def identify(self, observation_id: str, ident: Identification) -> dict[str, Any]:
        row = await self._alive(observation_id, for_update=True)
        now = datetime.now(UTC)
        record = IdentificationRow(
            id=str(uuid.uuid4()),
            observation_id=row.id,
            identified_by=ident.identifiedBy,
            scientific_name=ident.scientificName,
            taxon_rank=ident.taxonRank.value if ident.taxonRank else None,
            vernacular_name=ident.vernacularName,
            date_identified=(ident.dateIdentified or now).astimezone(UTC),
            remarks=ident.identificationRemarks,
            kind="human",
            created_at=now,
        )
        await self.repo.add_identification(record)
        await self.repo.update(row.id, {"updated_at": now, "version": row.version + 1})
        out = represent_identification(record)
        await self._emit(
            UPDATED,
            row.id,
            {"id": row.id, "version": row.version + 1, "changed": {"identifications": [out]}},
        )
        return out

    # --- media -----------------------------------------------------------------------------

    async def media_target(
        self, observation_id: str, media_id: str | None
    ) -> tuple[MediaOwner, MediaRow | None]:
        """The observation a media file is for (it must exist and be alive), and what is
        stored under ``media_id`` already, if anything."""
        row = _living(observation_id, await self.repo.media_owner(observation_id))
        return row, await self.repo.get_media(media_id) if media_id else None

    async def record_media(
        self, media: MediaRow, *, published_clean: bool
    ) -> tuple[dict[str, Any], bool]:
        """Store a media file's row, its bytes already stored; (media, created). The
        observation is read again (it may have changed since its file was checked): if it
        became obscured meanwhile, a copy not cleaned of EXIF is withheld, not published."""
        owner = await self.repo.media_owner(media.observation_id, for_update=True)
        row = _living(media.observation_id, owner)
        if row.location_obscured and not published_clean:
            media.public_key = media.public_sha256 = None
        now = datetime.now(UTC)
        media.created_at = now
        if not await self.repo.add_media(media, (now, row.version + 1)):
            prior = await self.repo.get_media(media.id)
            assert prior is not None
            return self.media_replay(prior, row.id, media.sha256), False
        out = represent_media(media, self.settings.public_url)
        await self._emit(
            UPDATED, row.id, {"id": row.id, "version": row.version + 1, "changed": {"media": [out]}}
        )
        return out, True

    def media_replay(self, prior: MediaRow, observation_id: str, sha256: str) -> dict[str, Any]:
        """The answer to an upload under a media id stored already: a retry, or a conflict."""
        if prior.observation_id != observation_id or prior.sha256 != sha256:
            raise MediaConflict(
                f"Media {prior.id} exists with other content or on another observation.",
                media_id=prior.id,
            )
        return represent_media(prior, self.settings.public_url)

    def _storage(self) -> MediaStorage:
        if self.storage is None:  # pragma: no cover - wiring error
            raise RuntimeError("no media storage configured")
        return self.storage

    async def _publish_media_without_exif(self, observation_id: str) -> None:
        for media in (await self.repo.media_of([observation_id]))[observation_id]:
            if media.storage_key and media.public_key == media.storage_key:
                key, digest = await public_copy(
                    self._storage(), self.settings, media.storage_key, _type_of(media)
                )
                await self.repo.set_public_copy(media.id, key, digest)

    async def media_file(self, media_id: str) -> MediaFile:
        media = await self.repo.media_file(media_id)
        if media is None:
            raise MediaNotFound(f"No media has the id {media_id}.")
        if media.public_key is None and media.external_url is None:
            raise MediaWithheld(f"Media {media_id} is not published.")
        return media

    # --- reading many ----------------------------------------------------------------------

    async def page(
        self, query: ListQuery, after: tuple[datetime, int] | None
    ) -> tuple[list[dict[str, Any]], tuple[datetime, int] | None]:
        """A page of published observations, and the key to continue after (None: the end)."""
        limit = min(query.limit or self.settings.page_size, self.settings.page_max)
        rows = await self.repo.page(query, sort=query.sort, after=after, limit=limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        items = await self._represent_many(rows)
        if not more:
            return items, None
        last = rows[-1]
        value = {
            "created": last.created_at,
            "eventDate": last.event_start,
            "updated": last.updated_at,
        }
        return items, (utc(value[query.sort.lstrip("-")]) or last.created_at, last.seq)

    async def _represent_many(self, rows: Sequence[ObservationRow]) -> list[dict[str, Any]]:
        ids = [r.id for r in rows]
        media, idents = await self.repo.media_of(ids), await self.repo.identifications_of(ids)
        return [self._represent(r, media[r.id], idents[r.id]) for r in rows]

    async def export_horizon(self) -> int:
        """The newest row an export starting now includes (later inserts are left out)."""
        return await self.repo.max_seq()

    async def export_batch(
        self, query: ObservationFilter, after: int, horizon: int
    ) -> tuple[list[dict[str, Any]], int | None]:
        """One batch of an export, and where the next one starts (None: the end)."""
        size = self.settings.export_batch
        rows = await self.repo.after_seq(query, after=after, max_seq=horizon, limit=size)
        items = await self._represent_many(rows)
        return items, (rows[-1].seq if len(rows) == size else None)

    # --- write-backs from other services ---------------------------------------------------

    async def apply_write_backs(
        self,
        scores: Sequence[tuple[ObservationScored, datetime]],
        verdicts: Sequence[tuple[ObservationIdentified, datetime]],
    ) -> None:
        """A batch of other services' write-backs: every observation they touch locked at
        once, in id order (two batches sharing rows cannot deadlock), then applied."""
        ids = [s.observation_id for s, _ in scores] + [v.observation_id for v, _ in verdicts]
        states = await self.repo.write_back_states(ids)
        await self._apply_scores(scores, states)
        await self._apply_identifications(verdicts, states)

    async def _apply_scores(
        self,
        scores: Sequence[tuple[ObservationScored, datetime]],
        states: dict[str, WriteBackState],
    ) -> None:
        """Quality's assessments, each dated by its event, in order: one is kept unless its
        observation is unknown here or has a later one already (an older one arriving late).
        An observation assessed several times in the batch is written once, as the last kept
        left it."""
        kept: dict[str, dict[str, Any]] = {}
        for scored, when in scores:
            state = states.get(scored.observation_id)
            if state is None or (state.quality_assessed_at or when) > when:
                continue
            states[scored.observation_id] = replace(state, quality_assessed_at=when)
            kept[scored.observation_id] = {
                "observation_id": scored.observation_id,
                "quality_score": scored.score,
                "quality_grade": scored.grade,
                "quality_flags": scored.flags,
                "quality_assessed_at": when,
            }
            metrics.observation_scored(state.dataset_id, scored.grade)
        await self.repo.update_many(list(kept.values()))

    async def _apply_identifications(
        self,
        verdicts: Sequence[tuple[ObservationIdentified, datetime]],
        states: dict[str, WriteBackState],
    ) -> None:
        """Plant identification's verdicts, each dated by its event, in order: each with a
        candidate adds a machine identification (its best candidate) to its observation, and
        becomes the best machine identification unless a later one is there already."""
        added: list[IdentificationRow] = []
        best: dict[str, dict[str, Any]] = {}
        for identified, when in verdicts:
            state = states.get(identified.observation_id)
            if state is None or not identified.candidates:
                continue
            top = identified.candidates[0]
            added.append(
                IdentificationRow(
                    id=str(uuid.uuid4()),
                    observation_id=identified.observation_id,
                    identified_by="machine:" + (identified.model_version or "unknown"),
                    scientific_name=top.scientificName,
                    taxon_rank=top.taxonRank,
                    date_identified=when,
                    kind="machine",
                    model_version=identified.model_version,
                    score=top.score,
                    created_at=datetime.now(UTC),
                )
            )
            if (state.best_identification_at or when) > when:
                continue
            states[identified.observation_id] = replace(state, best_identification_at=when)
            best[identified.observation_id] = {
                "observation_id": identified.observation_id,
                "best_identification": {
                    "scientificName": top.scientificName,
                    "taxonRank": top.taxonRank,
                    "score": top.score,
                    "modelVersion": identified.model_version,
                    "identifiedAt": _iso(when),
                },
                "best_identification_at": when,
            }
        await self.repo.add_identifications(added)
        await self.repo.update_many(list(best.values()))

    async def apply_detection(self, detection: DetectionCreated, when: datetime) -> str:
        """A video detection as a MachineObservation (its id derived from the detection,
        so a replay maps to the same observation), dated ``when`` (the event's time) when
        it has no wall-clock start (an uploaded video)."""
        observation_id = str(
            uuid.uuid5(uuid.NAMESPACE_URL, f"c4c:detection:{detection.detection_id}")
        )
        start = as_utc(detection.start or when)
        event_date = _iso(start) or ""
        if detection.end is not None and as_utc(detection.end) > start:
            event_date += "/" + (_iso(as_utc(detection.end)) or "")
        source = detection.stream_id or (f"job/{detection.job_id}" if detection.job_id else None)
        model = ObservationCreate(
            id=uuid.UUID(observation_id),
            datasetID=detection.project,
            recordedBy="video:" + (source or "unknown"),
            eventDate=event_date,
            decimalLatitude=detection.latitude,
            decimalLongitude=detection.longitude,
            scientificName=detection.label,
            basisOfRecord="MachineObservation",
            license=detection.license,
            occurrenceRemarks=f"Detection {detection.detection_id}"
            + (f", track {detection.track_id}" if detection.track_id is not None else "")
            + (f", score {detection.score:.3f}" if detection.score is not None else "")
            + (f", model {detection.model_version}" if detection.model_version else ""),
        )
        result = await self.create(model, idempotency_key=None, creator=DETECTION_CREATOR)
        if result.created and detection.snapshot_url:
            await self.repo.add_media(
                MediaRow(
                    id=str(
                        uuid.uuid5(uuid.NAMESPACE_URL, f"c4c:snapshot:{detection.detection_id}")
                    ),
                    observation_id=observation_id,
                    kind="image",
                    media_type="image/jpeg",
                    size=0,
                    sha256="",
                    external_url=_under(self.settings.public_url, detection.snapshot_url),
                    created_at=datetime.now(UTC),
                )
            )
        return observation_id


class MediaUploads:
    """Media uploads: the file is streamed, checked and stored outside any transaction (a
    transaction held across the upload and its fsync would hold SQLite's one connection, and
    serialise every upload behind the slowest client); short ones before and after, each
    shared by the uploads starting (or finishing) together. Nothing is kept from a file that
    fails a check."""

    def __init__(
        self,
        units: Callable[[], AbstractAsyncContextManager[IngestService]],
        readings: Callable[[], AbstractAsyncContextManager[IngestService]],
        storage: MediaStorage,
        settings: IngestSettings,
    ) -> None:
        self.units = units
        """Each call: a service in a transaction of its own, committed on exit."""
        self.readings = readings
        """Each call: a service in a read-only transaction (on SQLite, beside the writer)."""
        self.storage = storage
        self.settings = settings
        # Uploads starting together are checked in one read, those finishing together write
        # their rows in one transaction and their events go in one relay pass: each costs
        # more CPU than a photo's own checks.
        self._rows = GroupCommit(self._write, name="ingest:media-rows", max_items=MEDIA_GROUP)
        self._targets = GroupCommit(self._read, name="ingest:media-targets", max_items=MEDIA_GROUP)

    async def add(
        self,
        observation_id: str,
        media_id: str | None,
        chunks: AsyncIterable[bytes],
        declared_type: str | None,
    ) -> tuple[dict[str, Any], bool]:
        """Stream, check and store a media file; (media, created)."""
        service, row, prior = await self._targets.submit((observation_id, media_id))
        storage, max_bytes = self.storage, self.settings.media_max_bytes
        if prior is not None:
            staged = await storage.stage(chunks, max_bytes=max_bytes)
            await storage.discard(staged)
            return service.media_replay(prior, row.id, staged.sha256), False
        max_pixels = self.settings.media_max_pixels

        def check(head: bytes, file: BinaryIO) -> tuple[MediaType, ImageInfo | None]:
            media_type = require_type(head, declared_type)
            if media_type.kind != "image":
                return media_type, None
            return media_type, probe_image(file, media_type, max_pixels=max_pixels)

        # Checked in the worker thread that writes the file: one trip for a photo.
        staged, (media_type, info) = await storage.store(chunks, max_bytes=max_bytes, check=check)
        key = staged.key
        public_key: str | None = key
        public_sha256: str | None = staged.sha256
        if row.location_obscured:
            public_key, public_sha256 = await public_copy(storage, self.settings, key, media_type)
        media = MediaRow(
            id=media_id or str(uuid.uuid4()),
            observation_id=row.id,
            kind=media_type.kind,
            media_type=media_type.mime,
            size=staged.size,
            sha256=staged.sha256,
            storage_key=key,
            public_key=public_key,
            public_sha256=public_sha256,
            width=info.width if info else None,
            height=info.height if info else None,
            taken_at=info.taken_at if info else None,
            exif_latitude=info.latitude if info else None,
            exif_longitude=info.longitude if info else None,
        )
        return await self._rows.submit((media, row.location_obscured))

    async def _read(
        self, uploads: Sequence[tuple[str, str | None]]
    ) -> list[tuple[IngestService, MediaOwner, MediaRow | None] | Exception]:
        """For uploads starting together, each (observation id, media id): its
        ``media_target``, in one read-only transaction (with the service, for a replay)."""
        outcomes: list[tuple[IngestService, MediaOwner, MediaRow | None] | Exception] = []
        async with self.readings() as service:
            for observation_id, media_id in uploads:
                try:
                    outcomes.append(
                        (service, *await service.media_target(observation_id, media_id))
                    )
                except ProblemError as exc:
                    outcomes.append(exc)
        return outcomes

    async def _write(
        self, rows: Sequence[tuple[MediaRow, bool]]
    ) -> list[tuple[dict[str, Any], bool] | Exception]:
        """Media rows, each with whether its public copy is clean of EXIF, in one
        transaction; a row refused there (its observation deleted meanwhile, its id taken
        by other content) is refused before it writes anything, so the others go on. Their
        observations are locked in id order: two replicas' batches cannot deadlock."""
        outcomes: dict[int, tuple[dict[str, Any], bool] | Exception] = {}
        by_observation = sorted(range(len(rows)), key=lambda k: rows[k][0].observation_id)
        async with self.units() as service:
            for k in by_observation:
                media, published_clean = rows[k]
                try:
                    outcomes[k] = await service.record_media(media, published_clean=published_clean)
                except ProblemError as exc:
                    outcomes[k] = exc
        return [outcomes[k] for k in range(len(rows))]


async def public_copy(
    storage: MediaStorage, settings: IngestSettings, key: str, media_type: MediaType
) -> tuple[str | None, str | None]:
    """A copy without EXIF for an obscured observation; (None, None): withheld (types we
    cannot clean, e.g. video, are not published rather than published with a position)."""
    source = storage.local_path(key)
    if media_type.kind != "image" or source is None:
        return None, None
    buffer = BytesIO()
    try:
        await anyio.to_thread.run_sync(lambda: strip_metadata(source, buffer, media_type))
    except ProblemError:
        return None, None

    async def one_chunk() -> Any:
        yield buffer.getvalue()

    stored, _ = await storage.store(
        one_chunk(), max_bytes=settings.media_max_bytes, check=lambda head, file: None
    )
    return stored.key, stored.sha256


Living = TypeVar("Living", ObservationRow, MediaOwner)


def _living(observation_id: str, row: Living | None) -> Living:
    """``row``, of an observation that exists and is not deleted."""
    if row is None:
        raise ObservationNotFound(f"No observation has the id {observation_id}.")
    if row.deleted_at is not None:
        raise ObservationGone(f"Observation {observation_id} was deleted.")
    return row


def _subject(observation_id: str) -> str:
    return f"observation/{observation_id}"


def _type_of(media: MediaRow) -> MediaType:
    for known in KNOWN:
        if known.mime == media.media_type:
            return known
    raise ValueError(media.media_type)


def _check_version(row: ObservationRow, if_match: str) -> None:
    tags = [t.strip() for t in if_match.split(",")]
    if "*" not in tags and etag(row) not in tags:
        raise PreconditionFailed(
            f"Observation {row.id} is at version {row.version}; fetch it again.",
            current_etag=etag(row),
        )


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


def licence_uri(code: str) -> str:
    return Licence(code).uri
