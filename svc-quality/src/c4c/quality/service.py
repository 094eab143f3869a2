"""The quality service's domain: turn what is known of an observation into an assessment
(no HTTP, no SQL: the repository, the event sink, the media source and the offline
knowledge are ports)."""

from __future__ import annotations

import asyncio
import functools
import math
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

import anyio
import anyio.to_thread

from c4c.quality import images
from c4c.quality.geography import OfflineGeography, offline_geography
from c4c.quality.metrics import ASSESSMENT_DURATION, ASSESSMENTS
from c4c.quality.models import AssessmentRow, ImageRow, MachineIdRow, RuleSetRow, SeenObservation
from c4c.quality.repository import Repository
from c4c.quality.rules import CHECKS, CheckSettings, Result, RuleSet, assess
from c4c.quality.rules import dates as date_rules
from c4c.quality.rules.evidence import haversine_km
from c4c.quality.rules.model import (
    Context,
    Duplicate,
    Identification,
    ImageFacts,
    MachineId,
    Measurement,
    Media,
    Observation,
    ObserverRecord,
    TaxonRecords,
)
from c4c.quality.rules.plausibility import measurement_key
from c4c.quality.schemas import ObservationIn, RuleSetIn
from c4c.quality.settings import QualitySettings
from c4c.shared.problems import NotFound, ProblemError
from c4c.shared.taxonomy import Backbone, Match, Taxon, load_backbone

SCORED = "observation.scored"
ACCEPTED_RECORDS_LIMIT = 2000
MEASUREMENT_HISTORY = 20
_NAME_CACHE_SIZE = 100_000


RULESET_TTL_S = 5.0  # another replica's new rule-set version is used within this delay


class RuleSetCache:
    """Rule sets by project, read from the database at most every few seconds."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, RuleSet]] = {}

    def get(self, project: str) -> RuleSet | None:
        entry = self._entries.get(project)
        if entry is None or time.monotonic() - entry[0] > RULESET_TTL_S:
            return None
        return entry[1]

    def put(self, ruleset: RuleSet) -> None:
        self._entries[ruleset.project] = (time.monotonic(), ruleset)

    def forget(self, project: str) -> None:
        self._entries.pop(project, None)


class UnknownCheck(ProblemError):
    status, code, title = 422, "unknown-check", "The rule set names a check that does not exist"


class EventSink(Protocol):
    def emit(self, type: str, data: dict[str, Any], subject: str) -> None: ...


class MediaSource(Protocol):
    async def fetch(self, url: str, *, max_bytes: int) -> bytes: ...


class Knowledge:
    """The offline taxonomy and geography, loaded once per process off the event loop, and
    name matches cached (a miss is matched in a worker thread: fuzzy matching scans)."""

    def __init__(self) -> None:
        self._backbone: Backbone | None = None
        self._geography: OfflineGeography | None = None
        self._loading: asyncio.Lock | None = None
        self._matches: dict[str, Match] = {}

    async def load(self) -> None:
        if self._backbone is not None and self._geography is not None:
            return
        if self._loading is None:
            self._loading = asyncio.Lock()
        async with self._loading:
            if self._backbone is None:
                self._backbone = await load_backbone()
            if self._geography is None:
                self._geography = await anyio.to_thread.run_sync(offline_geography().load)

    @property
    def geography(self) -> OfflineGeography:
        assert self._geography is not None, "await load() first"
        return self._geography

    async def match(self, name: str) -> Match:
        found = self._matches.get(name)
        if found is None:
            await self.load()
            assert self._backbone is not None
            found = await anyio.to_thread.run_sync(self._backbone.match, name)
            if len(self._matches) >= _NAME_CACHE_SIZE:
                self._matches.clear()
            self._matches[name] = found
        return found

    async def taxa(self, names: set[str]) -> dict[str, Taxon]:
        matched = {name: await self.match(name) for name in names}
        return {name: m.taxon for name, m in matched.items() if m.taxon is not None}


def observation_from(data: ObservationIn) -> Observation:
    captive = bool(data.captive) or data.degreeOfEstablishment in ("captive", "cultivated")
    return Observation(
        id=data.id,
        version=data.version,
        project=data.datasetID,
        recorded_by=data.recordedBy,
        event_date=data.eventDate,
        latitude=data.decimalLatitude,
        longitude=data.decimalLongitude,
        uncertainty_m=data.coordinateUncertaintyInMeters,
        country_code=data.countryCode,
        scientific_name=data.scientificName,
        basis_of_record=data.basisOfRecord,
        individual_count=data.individualCount,
        captive=captive,
        media=tuple(
            Media(m.id, m.url, m.type, m.format, m.created, m.exifLatitude, m.exifLongitude)
            for m in data.media
        ),
        identifications=tuple(
            Identification(i.identifiedBy, i.scientificName, i.kind, i.score)
            for i in data.identifications
        ),
        measurements=tuple(
            Measurement(m.measurementType, m.measurementValue, m.measurementUnit)
            for m in data.measurements
        ),
        quality_votes={k: v.model_dump() for k, v in data.qualityVotes.items()},
    )


def ruleset_from(project: str, row: RuleSetRow | None) -> RuleSet:
    if row is None:
        return RuleSet(project=project)
    body = RuleSetIn.model_validate(row.body)
    return RuleSet(
        project=project,
        version=row.version,
        checks={
            name: CheckSettings(c.enabled, c.weight, c.params) for name, c in body.checks.items()
        },
        research_min_score=body.research_min_score,
    )


def _bands(phash: int) -> list[int]:
    return [(phash >> shift) & 0xFFFF for shift in (48, 32, 16, 0)]


def _signed(phash: int) -> int:
    """A 64-bit hash as the signed integer a BIGINT column holds."""
    return phash - (1 << 64) if phash >= 1 << 63 else phash


def _day_of_year(event_date: str | None) -> int | None:
    if not event_date:
        return None
    try:
        start, end = date_rules.event_period(event_date)
    except (ValueError, OverflowError):
        return None
    return start.timetuple().tm_yday if (end - start).days <= 1 else None


def _day_distance(a: int, b: int) -> int:
    d = abs(a - b) % 366
    return min(d, 366 - d)


def merge_changes(body: dict[str, Any], changed: Mapping[str, Any]) -> dict[str, Any]:
    """An observation snapshot with an ``observation.updated`` applied: media and
    identifications are added (by id), other fields replaced."""
    merged = dict(body)
    for key, value in changed.items():
        if key in ("media", "identifications") and isinstance(value, list):
            known = {
                item.get("id"): item for item in merged.get(key) or [] if isinstance(item, dict)
            }
            for item in value:
                if isinstance(item, dict):
                    known[item.get("id") or str(uuid.uuid4())] = item
            merged[key] = list(known.values())
        else:
            merged[key] = value
    return merged


class QualityService:
    def __init__(
        self,
        repo: Repository,
        events: EventSink | None,
        settings: QualitySettings,
        media: MediaSource,
        knowledge: Knowledge,
        image_limiter: anyio.CapacityLimiter,
        rulesets: RuleSetCache,
    ) -> None:
        self.repo = repo
        self.events = events
        self.settings = settings
        self.media = media
        self.knowledge = knowledge
        self.image_limiter = image_limiter
        self.rulesets = rulesets

    async def _ruleset(self, project: str) -> RuleSet:
        ruleset = self.rulesets.get(project)
        if ruleset is None:
            ruleset = ruleset_from(project, await self.repo.latest_ruleset(project))
            self.rulesets.put(ruleset)
        return ruleset

    # --- assessing --------------------------------------------------------------------------

    async def assess(
        self, data: ObservationIn, *, record: bool = False
    ) -> tuple[dict[str, Any], Observation, Result]:
        """Score an observation. Unrecorded (the synchronous API) nothing is written; recorded
        (events) its photos' analyses join the duplicate index and the assessment is kept."""
        started = time.perf_counter()
        obs = observation_from(data)
        await self.knowledge.load()
        ruleset = await self._ruleset(obs.project or "default")
        facts, unfetched = await self._images(obs, record=record)
        ctx = await self._context(obs, facts, unfetched)
        result = assess(obs, ctx, ruleset)
        kind = "image" if facts else "metadata"
        ASSESSMENT_DURATION.labels(kind).observe(time.perf_counter() - started)
        ASSESSMENTS.labels(ruleset.project, result.grade).inc()
        out = {
            "assessment_id": str(uuid.uuid4()) if record else None,
            "observation_id": obs.id,
            "observation_version": obs.version,
            "score": result.score,
            "grade": result.grade,
            "flags": [f.as_dict() for f in result.flags],
            "community_taxon": (
                {
                    "scientificName": result.community.name,
                    "taxonRank": result.community.rank,
                    "supporting": result.community.supporting,
                    "considered": result.community.considered,
                }
                if result.community
                else None
            ),
            "ruleset": {"project": ruleset.project, "version": ruleset.version},
            "assessed_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        }
        return out, obs, result

    async def _context(
        self, obs: Observation, facts: list[ImageFacts], unfetched: dict[str, str]
    ) -> Context:
        names = {i.scientific_name for i in obs.identifications}
        machine = await self._machine_id(obs.id)
        if obs.scientific_name:
            names.add(obs.scientific_name)
        if machine and machine.scientific_name:
            names.add(machine.scientific_name)
        taxa = await self.knowledge.taxa(names)
        match = await self.knowledge.match(obs.scientific_name) if obs.scientific_name else None
        ctx = Context(
            now=datetime.now(UTC),
            geography=self.knowledge.geography,
            taxon_match=match,
            taxon_of=taxa.get,
            images=tuple(facts),
            duplicates=tuple(await self._duplicates(obs, facts)),
            machine_id=machine,
            unfetched_media=unfetched,
        )
        taxon = match.taxon.scientific_name if match and match.taxon else None
        if taxon:
            ctx.taxon_records = await self._taxon_records(obs, taxon)
        if obs.recorded_by:
            total, research = await self.repo.observer_counts(obs.recorded_by, obs.id)
            ctx.observer = ObserverRecord(total, research)
            if obs.measurements:
                ctx.recent_measurements = await self._recent_measurements(obs)
        return ctx

    async def _taxon_records(self, obs: Observation, taxon: str) -> TaxonRecords:
        records = await self.repo.accepted_records(taxon, obs.id, ACCEPTED_RECORDS_LIMIT)
        nearest_km = nearest_days = None
        lat, lon = obs.latitude, obs.longitude
        if records and lat is not None and lon is not None and math.isfinite(lat + lon):
            nearest_km = min(haversine_km(lat, lon, r[0], r[1]) for r in records)
        day = _day_of_year(obs.event_date)
        days = [r[2] for r in records if r[2] is not None]
        if day is not None and days:
            nearest_days = min(_day_distance(day, d) for d in days)
        return TaxonRecords(len(records), nearest_km, nearest_days)

    async def _recent_measurements(self, obs: Observation) -> dict[str, tuple[float, ...]]:
        assert obs.recorded_by is not None
        series: dict[str, list[float]] = {}
        for items in await self.repo.recent_measurements(
            obs.recorded_by, obs.id, MEASUREMENT_HISTORY
        ):
            for m in items:
                value = m.get("measurementValue")
                if isinstance(value, int | float) and not isinstance(value, bool):
                    key = measurement_key(str(m.get("measurementType")), m.get("measurementUnit"))
                    series.setdefault(key, []).append(float(value))
        return {k: tuple(v) for k, v in series.items()}

    async def _machine_id(self, observation_id: str | None) -> MachineId | None:
        if observation_id is None:
            return None
        row = await self.repo.machine_id(observation_id)
        if row is None:
            return None
        best = (row.body.get("candidates") or [{}])[0]
        return MachineId(
            bool(row.body.get("rejected")), best.get("scientificName"), best.get("score")
        )

    # --- photos -----------------------------------------------------------------------------

    async def _images(
        self, obs: Observation, *, record: bool
    ) -> tuple[list[ImageFacts], dict[str, str]]:
        photos = [m for m in obs.media if m.url and m.type in ("image", None)]
        photos = photos[: self.settings.max_media_per_observation]
        known = await self.repo.images([m.id for m in photos if m.id])
        facts: list[ImageFacts] = []
        unfetched: dict[str, str] = {}
        for media in photos:
            stored = known.get(media.id or "")
            if stored is not None:
                facts.append(ImageFacts(**stored.facts))
                continue
            assert media.url is not None
            try:
                data = await self.media.fetch(media.url, max_bytes=self.settings.media_max_bytes)
            except ProblemError as exc:
                if getattr(exc, "retryable", False) and record:
                    raise  # the bus retries the event later
                unfetched[media.url] = str(exc.detail)[:300]
                continue
            async with self.image_limiter:
                found = await anyio.to_thread.run_sync(
                    functools.partial(
                        images.analyse,
                        data,
                        media.id,
                        max_pixels=self.settings.media_max_pixels,
                    )
                )
            facts.append(found)
            if record and media.id and obs.id:
                await self._index(found, media.id, obs)
        return facts, unfetched

    async def _index(self, facts: ImageFacts, media_id: str, obs: Observation) -> None:
        bands = _bands(facts.phash) if facts.phash is not None else [None] * 4
        await self.repo.save_image(
            ImageRow(
                media_id=media_id,
                observation_id=obs.id,
                recorded_by=obs.recorded_by,
                facts=facts.__dict__,
                phash=_signed(facts.phash) if facts.phash is not None else None,
                band0=bands[0],
                band1=bands[1],
                band2=bands[2],
                band3=bands[3],
            )
        )

    async def _duplicates(self, obs: Observation, facts: list[ImageFacts]) -> list[Duplicate]:
        found = []
        ruleset_max = CHECKS["duplicates"].params["max_distance"]
        for item in facts:
            if item.phash is None:
                continue
            for other in await self.repo.images_sharing_a_band(_bands(item.phash), obs.id):
                if other.phash is None:
                    continue
                distance = images.hamming(item.phash, other.phash % (1 << 64))
                if distance <= ruleset_max:
                    found.append(
                        Duplicate(
                            item.media_id,
                            other.observation_id,
                            other.media_id,
                            other.recorded_by,
                            distance,
                        )
                    )
        return found

    # --- events -----------------------------------------------------------------------------

    async def observed(self, body: dict[str, Any], when: datetime) -> None:
        """An observation created or changed: keep its snapshot, score it, publish."""
        data = ObservationIn.model_validate(body)
        assessment, obs, result = await self.assess(data, record=True)
        match = await self.knowledge.match(obs.scientific_name) if obs.scientific_name else None
        taxon = result.community.name if result.community else None
        if taxon is None and match is not None and match.taxon is not None:
            taxon = match.taxon.scientific_name
        assert obs.id is not None
        await self.repo.save_seen(
            SeenObservation(
                id=obs.id,
                version=obs.version or 0,
                project=obs.project or "default",
                recorded_by=obs.recorded_by,
                taxon=taxon,
                latitude=obs.latitude
                if obs.latitude is not None and math.isfinite(obs.latitude)
                else None,
                longitude=obs.longitude
                if obs.longitude is not None and math.isfinite(obs.longitude)
                else None,
                day_of_year=_day_of_year(obs.event_date),
                grade=result.grade,
                body=body,
                measurements=[m.model_dump() for m in data.measurements],
                deleted=False,
                updated_at=when,
            )
        )
        await self.repo.add_assessment(
            AssessmentRow(
                id=assessment["assessment_id"],
                observation_id=obs.id,
                observation_version=obs.version,
                score=result.score,
                grade=result.grade,
                flags=assessment["flags"],
                community_taxon=assessment["community_taxon"],
                ruleset_project=assessment["ruleset"]["project"],
                ruleset_version=assessment["ruleset"]["version"],
                created_at=datetime.now(UTC),
            )
        )
        if self.events is not None:
            self.events.emit(SCORED, assessment, f"observation/{obs.id}")

    async def created(self, body: dict[str, Any], when: datetime) -> None:
        prior = await self.repo.seen(str(body.get("id")), for_update=True)
        if prior is not None and prior.version > int(body.get("version") or 0):
            return  # a later update already got here
        await self.observed(body, when)

    async def updated(
        self, observation_id: str, version: int | None, changed: Mapping[str, Any], when: datetime
    ) -> bool:
        """False when the observation is unknown here (the caller may fetch it)."""
        prior = await self.repo.seen(observation_id, for_update=True)
        if prior is None:
            return False
        if prior.deleted:
            return True
        body = merge_changes(prior.body, changed)
        body["version"] = max(prior.version, version or 0)
        await self.observed(body, when)
        return True

    async def deleted(self, observation_id: str) -> None:
        prior = await self.repo.seen(observation_id, for_update=True)
        if prior is not None:
            await self.repo.save_seen(replace_row(prior, deleted=True))

    async def identified(self, observation_id: str, body: dict[str, Any], when: datetime) -> None:
        """Plant identification's verdict: kept, and the observation re-scored with it."""
        prior_id = await self.repo.machine_id(observation_id)
        if prior_id is not None and prior_id.identified_at.replace(tzinfo=UTC) > when:
            return
        await self.repo.save_machine_id(
            MachineIdRow(observation_id=observation_id, body=body, identified_at=when)
        )
        prior = await self.repo.seen(observation_id, for_update=True)
        if prior is not None and not prior.deleted:
            await self.observed(prior.body, when)

    # --- reading ----------------------------------------------------------------------------

    async def history(self, observation_id: str) -> dict[str, Any]:
        rows = await self.repo.assessments(observation_id, self.settings.history_limit)
        if not rows:
            raise NotFound(f"No assessment of observation {observation_id}.")
        items = [assessment_of(row) for row in rows]
        return {"observation_id": observation_id, "latest": items[0], "history": items}

    async def ruleset(self, project: str) -> dict[str, Any]:
        row = await self.repo.latest_ruleset(project)
        body = RuleSetIn.model_validate(row.body if row else {})
        return {
            "project": project,
            "version": row.version if row else 0,
            **body.model_dump(),
            "available_checks": {
                name: {"description": c.description, "params": dict(c.params)}
                for name, c in CHECKS.items()
            },
        }

    async def put_ruleset(self, project: str, body: RuleSetIn) -> dict[str, Any]:
        unknown = sorted(set(body.checks) - set(CHECKS))
        if unknown:
            raise UnknownCheck(f"Unknown checks: {', '.join(unknown)}.", unknown=unknown)
        for name, check in body.checks.items():
            extra = sorted(set(check.params) - set(CHECKS[name].params))
            if extra:
                raise UnknownCheck(
                    f"The check {name} has no parameters {', '.join(extra)}.", unknown=extra
                )
        prior = await self.repo.latest_ruleset(project)
        await self.repo.add_ruleset(
            RuleSetRow(
                project=project,
                version=(prior.version if prior else 0) + 1,
                body=body.model_dump(),
                created_at=datetime.now(UTC),
            )
        )
        self.rulesets.forget(project)
        return await self.ruleset(project)


def replace_row(row: SeenObservation, **values: Any) -> SeenObservation:
    for key, value in values.items():
        setattr(row, key, value)
    return row


def assessment_of(row: AssessmentRow) -> dict[str, Any]:
    return {
        "assessment_id": row.id,
        "observation_id": row.observation_id,
        "observation_version": row.observation_version,
        "score": row.score,
        "grade": row.grade,
        "flags": row.flags,
        "community_taxon": row.community_taxon,
        "ruleset": {"project": row.ruleset_project, "version": row.ruleset_version},
        "assessed_at": row.created_at.replace(tzinfo=UTC).isoformat().replace("+00:00", "Z"),
    }
