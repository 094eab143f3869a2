"""The quality service's domain: turn what is known of an observation into an assessment
(no HTTP, no SQL: the repository, the event sink, the media source and the offline
knowledge are ports).

Observations are assessed in batches (a batch of one for an event): what the suite knows
around them is read in bulk (see ``background``), photos are fetched and analysed before
any database work, and the checks then run on what is in hand."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import math
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import anyio
import anyio.to_thread
import numpy as np
import numpy.typing as npt
from pydantic import ValidationError

from c4c.quality import images
from c4c.quality.background import (
    ACCEPTED_RECORDS_LIMIT,
    MEASUREMENT_HISTORY,
    Background,
    ContextCache,
    Counted,
    TaxonPoints,
    cached_or_loaded,
)
from c4c.quality.geography import OfflineGeography, offline_geography
from c4c.quality.metrics import ASSESSMENT_DURATION, ASSESSMENTS
from c4c.quality.models import AssessmentRow, ImageRow, MachineIdRow, RuleSetRow, SeenObservation
from c4c.quality.repository import IndexedPhoto, Repository
from c4c.quality.rules import CHECKS, CheckSettings, Result, RuleSet, assess, param_error
from c4c.quality.rules import dates as date_rules
from c4c.quality.rules.model import (
    Context,
    Duplicate,
    Identification,
    ImageFacts,
    MachineId,
    Measurement,
    Media,
    Observation,
)
from c4c.quality.schemas import ObservationIn, RuleSetIn
from c4c.quality.settings import QualitySettings
from c4c.shared.problems import NotFound, ProblemError
from c4c.shared.taxonomy import Backbone, Match, Taxon, load_backbone

SCORED = "observation.scored"
log = logging.getLogger("c4c.quality")
_NAME_CACHE_SIZE = 100_000
DUPLICATE_CANDIDATES_EACH = 200
"""Indexed photos read per photo assessed that share one of its hash bands."""
DURATION = {
    False: ASSESSMENT_DURATION.labels("metadata"),
    True: ASSESSMENT_DURATION.labels("image"),
}
"""The duration histogram's children by whether photos were analysed (labels looked up
once: per assessment they cost as much as a check)."""

Assessed = tuple[dict[str, Any], Observation, Result]
"""The assessment as published, the observation as the checks saw it, the engine's result."""


class UnknownCheck(ProblemError):
    status, code, title = 422, "unknown-check", "The rule set names a check that does not exist"


class InvalidParameter(ProblemError):
    status, code, title = 422, "invalid-parameter", "A check's parameter is out of its range"


class PhotosChanged(Exception):
    """A photo to assess was not fetched beforehand (the observation changed meanwhile):
    fetch again, outside the transaction."""


class EventSink(Protocol):
    async def emit_many(self, type: str, items: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Events of one type, given as (subject, data), in the caller's transaction."""


class MediaSource(Protocol):
    async def fetch(self, url: str, *, max_bytes: int) -> bytes: ...


class KnowledgeNotLoaded(Exception):
    """The taxonomy and geography could not be loaded (the process is stopping)."""


class Knowledge:
    """The offline taxonomy and geography, loaded once per process off the event loop, and
    name matches cached (a miss is matched in a worker thread: fuzzy matching scans)."""

    def __init__(self) -> None:
        self._backbone: Backbone | None = None
        self._geography: OfflineGeography | None = None
        self._loading: asyncio.Lock | None = None
        self._matches: dict[str, Match] = {}

    @property
    def loaded(self) -> bool:
        return self._backbone is not None and self._geography is not None

    async def load(self) -> None:
        """The taxonomy and geography, loaded once off the event loop (seconds)."""
        if self.loaded:
            return
        if self._loading is None:
            self._loading = asyncio.Lock()
        async with self._loading:
            try:
                if self._backbone is None:
                    self._backbone = await load_backbone()
                if self._geography is None:
                    self._geography = await anyio.to_thread.run_sync(
                        offline_geography().load, abandon_on_cancel=True
                    )
            except KeyboardInterrupt as exc:
                # polars notices Ctrl-C in its loading thread; out of a task, the interrupt
                # would stop the event loop before the clean shutdown it asked for.
                raise KnowledgeNotLoaded("interrupted while loading") from exc

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

    async def matches(self, names: set[str]) -> dict[str, Match]:
        return {name: await self.match(name) for name in names}


def photos_of(obs: Observation, limit: int) -> list[Media]:
    return [m for m in obs.media if m.url and m.type in ("image", None)][:limit]


def _lacks_exif(media: Media) -> bool:
    return media.exif_taken_at is None and media.exif_latitude is None


@dataclass
class Photos:
    """Photos fetched and analysed ahead of an assessment, by URL, and why others could not
    be fetched."""

    analysed: dict[str, ImageFacts] = field(default_factory=dict)
    unfetched: dict[str, str] = field(default_factory=dict)


class PhotoAnalyser:
    """Fetches photos and analyses them in worker threads (at most ``image_workers`` at
    once), never holding a database session."""

    def __init__(
        self, media: MediaSource, settings: QualitySettings, limiter: anyio.CapacityLimiter
    ) -> None:
        self.media = media
        self.settings = settings
        self.limiter = limiter

    def wanted(
        self, observations: Sequence[Observation], stored: Mapping[str, ImageFacts]
    ) -> list[Media]:
        """The photos of ``observations`` to fetch: those not ``stored`` (by media id), each
        URL once."""
        wanted: dict[str, Media] = {}
        for obs in observations:
            for media in photos_of(obs, self.settings.max_media_per_observation):
                if media.url and (media.id is None or media.id not in stored):
                    wanted.setdefault(media.url, media)
        return list(wanted.values())

    async def collect(self, wanted: Sequence[Media], *, retry_on_failure: bool = False) -> Photos:
        """Fetch and analyse photos. A fetch failure is a flag, unless it is worth retrying
        and ``retry_on_failure`` (events) says to raise."""
        photos = Photos()
        await asyncio.gather(*(self._one(media, photos, retry_on_failure) for media in wanted))
        return photos

    async def _one(self, media: Media, photos: Photos, retry_on_failure: bool) -> None:
        assert media.url is not None
        try:
            data = await self.media.fetch(media.url, max_bytes=self.settings.media_max_bytes)
        except ProblemError as exc:
            if getattr(exc, "retryable", False) and retry_on_failure:
                raise  # the bus retries the event later
            photos.unfetched[media.url] = str(exc.detail)[:300]
            return
        analyse = functools.partial(
            images.analyse,
            data,
            media.id,
            max_pixels=self.settings.media_max_pixels,
            read_exif=_lacks_exif(media),
        )
        photos.analysed[media.url] = await anyio.to_thread.run_sync(analyse, limiter=self.limiter)


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


def stored_body(row: RuleSetRow | None) -> RuleSetIn:
    """A stored rule set as the API takes it; one stored before its values were checked
    (NaN kept as null) and no longer valid reads as the defaults, with a log line."""
    try:
        return RuleSetIn.model_validate(row.body if row else {})
    except ValidationError:
        assert row is not None
        log.exception("rule set %s v%s is invalid: defaults apply", row.project, row.version)
        return RuleSetIn()


def ruleset_from(project: str, row: RuleSetRow | None) -> RuleSet:
    if row is None:
        return RuleSet(project=project)
    body = stored_body(row)
    return RuleSet(
        project=project,
        version=row.version,
        checks={
            name: CheckSettings(c.enabled, c.weight, _valid_params(name, c.params))
            for name, c in body.checks.items()
            if name in CHECKS
        },
        research_min_score=body.research_min_score,
    )


def _valid_params(check: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The stored parameters still valid; the others take their defaults."""
    return {k: v for k, v in params.items() if param_error(check, k, v) is None}


def _bands(phash: int) -> list[int]:
    return [(phash >> shift) & 0xFFFF for shift in (48, 32, 16, 0)]


def _signed(phash: int) -> int:
    """A 64-bit hash as the signed integer a BIGINT column holds."""
    return phash - (1 << 64) if phash >= 1 << 63 else phash


class DuplicateCandidates:
    """A batch's duplicate candidates that have a hash, the hashes in one array: each photo
    is compared with all of them in one vector operation."""

    def __init__(self, photos: Sequence[IndexedPhoto]) -> None:
        self.photos = [p for p in photos if p.phash is not None]
        self.hashes = images.hash_array(p.phash for p in self.photos if p.phash is not None)
        # Their owners and ids too, so a photo's matches are told apart in vector operations.
        self.observation_ids = np.array([p.observation_id for p in self.photos], dtype=object)
        self.media_ids = np.array([p.media_id for p in self.photos], dtype=object)
        self.recorded_by = np.array([p.recorded_by for p in self.photos], dtype=object)
        self.has_observer = np.array([p.recorded_by is not None for p in self.photos], dtype=bool)

    def of_other_users(self, recorded_by: str | None) -> npt.NDArray[np.bool_]:
        """Which candidates are another user's than ``recorded_by``."""
        mask: npt.NDArray[np.bool_] = self.has_observer & (self.recorded_by != recorded_by)
        return mask


def _day_of_year(event_date: str | None) -> int | None:
    if not event_date:
        return None
    try:
        start, end = date_rules.event_period(event_date)
    except (ValueError, OverflowError):
        return None
    return start.timetuple().tm_yday if (end - start).days <= 1 else None


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


@dataclass(frozen=True)
class Change:
    """One event about an observation: ``body`` for a creation (or an update of an
    observation unknown here, as ingest has it now), ``changed`` for an update, ``verdict``
    for plant identification's."""

    observation_id: str
    when: datetime
    body: dict[str, Any] | None = None
    changed: Mapping[str, Any] | None = None
    version: int | None = None
    verdict: dict[str, Any] | None = None


@dataclass(frozen=True)
class Settled:
    """An observation after a run of changes: ``body`` to score (None: nothing to score),
    ``missing`` when an update found it unknown here, ``before`` the observer and taxon its
    earlier snapshot counted under (their cached summaries change)."""

    body: dict[str, Any] | None
    when: datetime
    missing: bool = False
    before: tuple[str | None, str | None] = (None, None)


def settle(prior: SeenObservation | None, changes: Sequence[Change]) -> Settled:
    """Apply changes, in the order they came, to what was seen of an observation: a creation
    older than what is known is ignored, an update merges into the snapshot (or stands for
    a creation when it carries the whole observation), nothing revives a deleted one but
    its creation, and a verdict re-scores what is known."""
    body = prior.body if prior is not None else None
    version = prior.version if prior is not None else 0
    deleted = prior.deleted if prior is not None else False
    score = missing = False
    for change in changes:
        whole = change.body
        if whole is not None and (
            body is None or (change.changed is None and version <= int(whole.get("version") or 0))
        ):
            body, version, deleted = whole, int(whole.get("version") or 0), False
            score = True
        elif change.changed is not None:
            if body is None:
                missing = True
            elif not deleted:
                version = max(version, change.version or 0)
                body = merge_changes(body, change.changed) | {"version": version}
                score = True
        elif change.verdict is not None and body is not None and not deleted:
            score = True
    return Settled(
        body if score else None,
        changes[-1].when,
        missing,
        (prior.recorded_by, prior.taxon) if prior is not None else (None, None),
    )


def settle_all(
    prior: Mapping[str, SeenObservation], changes: Sequence[Change]
) -> dict[str, Settled]:
    """What ``changes`` leave of each observation they touch, given what was seen of them."""
    by_id: dict[str, list[Change]] = {}
    for change in changes:
        by_id.setdefault(change.observation_id, []).append(change)
    return {id_: settle(prior.get(id_), own) for id_, own in by_id.items()}


class QualityService:
    def __init__(
        self,
        repo: Repository,
        events: EventSink | None,
        settings: QualitySettings,
        photos: PhotoAnalyser,
        knowledge: Knowledge,
        cache: ContextCache,
    ) -> None:
        self.repo = repo
        self.events = events
        self.settings = settings
        self.photos = photos
        self.knowledge = knowledge
        self.cache = cache

    async def _ruleset(self, project: str) -> RuleSet:
        ruleset = self.cache.rulesets.get(project)
        if ruleset is None:
            ruleset = ruleset_from(project, await self.repo.latest_ruleset(project))
            self.cache.rulesets.put(project, ruleset)
        return ruleset

    # --- assessing --------------------------------------------------------------------------

    async def assess(self, data: ObservationIn) -> dict[str, Any]:
        """Score an observation now; nothing is written."""
        return (await self.assess_many([data]))[0][0]

    async def assess_many(
        self,
        items: Sequence[ObservationIn],
        *,
        record: bool = False,
        photos: Photos | None = None,
        seen: Mapping[str, SeenObservation] | None = None,
    ) -> list[Assessed]:
        """Score observations. Unrecorded (the synchronous API) nothing is written and photos
        are fetched here, before the bulk reads; recorded (events)
        the photos come analysed in ``photos`` (else :class:`PhotosChanged`), join the
        duplicate index, and the assessments are kept by the caller. ``seen``: what the
        caller read of these observations (else it is read here)."""
        started = time.perf_counter()
        observations = [observation_from(data) for data in items]
        if not record:
            # Before any database read: no connection (SQLite's single one) is held meanwhile.
            photos = await self.photos.collect(self.photos.wanted(observations, {}))
        await self.knowledge.load()
        rulesets = {
            p: await self._ruleset(p) for p in {o.project or "default" for o in observations}
        }
        background, matches, taxa = await self._background(observations, seen)
        stored = await self._stored_photos(observations)
        photos = photos or Photos()
        candidates = DuplicateCandidates(
            await self._duplicate_candidates([*stored.values(), *photos.analysed.values()])
        )
        geography = self.knowledge.geography
        geography.prime((o.latitude, o.longitude) for o in observations)
        shared_s = (time.perf_counter() - started) / max(len(observations), 1)
        now = datetime.now(UTC)
        assessed_at = now.isoformat().replace("+00:00", "Z")
        out = []
        indexed: list[ImageRow] = []
        grades: Counter[tuple[str, str]] = Counter()
        for obs in observations:
            began = time.perf_counter()
            obs, facts, unfetched = self._photo_facts(obs, stored, photos)
            ruleset = rulesets[obs.project or "default"]
            match = matches.get(obs.scientific_name) if obs.scientific_name else None
            ctx = Context(
                now=now,
                geography=geography,
                taxon_match=match,
                taxon_of=taxa.get,
                machine_id=background.machine_ids.get(obs.id or ""),
                unfetched_media=unfetched,
            )
            if facts:
                if record:
                    indexed.extend(self._index(obs, facts))
                ctx.images = tuple(facts.values())
                max_distance = int(ruleset.params("duplicates")["max_distance"])
                ctx.duplicates = tuple(self._duplicates(obs, facts, candidates, max_distance))
            taxon = match.taxon.scientific_name if match and match.taxon else None
            if taxon is not None and taxon in background.taxa:
                ctx.taxon_records = background.taxa[taxon].records_for(
                    obs.id, obs.latitude, obs.longitude, _day_of_year(obs.event_date)
                )
            if obs.recorded_by:
                ctx.observer = background.observer(obs.id, obs.recorded_by)
                if obs.measurements:
                    ctx.recent_measurements = background.recent_measurements(
                        obs.id, obs.recorded_by
                    )
            result = assess(obs, ctx, ruleset)
            out.append((self._published(obs, result, ruleset, record, assessed_at), obs, result))
            DURATION[bool(facts)].observe(shared_s + time.perf_counter() - began)
            grades[(ruleset.project, result.grade)] += 1
        await self.repo.save_images(indexed)
        for (project, grade), count in grades.items():
            ASSESSMENTS.labels(project, grade).inc(count)
        return out

    @staticmethod
    def _published(
        obs: Observation, result: Result, ruleset: RuleSet, record: bool, assessed_at: str
    ) -> dict[str, Any]:
        community = result.community
        return {
            "assessment_id": str(uuid.uuid4()) if record else None,
            "observation_id": obs.id,
            "observation_version": obs.version,
            "score": result.score,
            "grade": result.grade,
            "flags": [f.as_dict() for f in result.flags],
            "community_taxon": (
                {
                    "scientificName": community.name,
                    "taxonRank": community.rank,
                    "supporting": community.supporting,
                    "considered": community.considered,
                }
                if community
                else None
            ),
            "ruleset": {"project": ruleset.project, "version": ruleset.version},
            "assessed_at": assessed_at,
        }

    async def _background(
        self, observations: Sequence[Observation], seen: Mapping[str, SeenObservation] | None
    ) -> tuple[Background, dict[str, Match], dict[str, Taxon]]:
        """What the suite knows around these observations: one query per kind for the whole
        batch, the observers' and taxa's summaries from the cache when fresh there."""
        ids = sorted({o.id for o in observations if o.id})
        background = Background()
        counted = (
            await self.repo.counted(ids)
            if seen is None
            else {i: (row.recorded_by, row.grade) for i, row in seen.items() if not row.deleted}
        )
        background.counted = {id_: Counted(*summary) for id_, summary in counted.items()}
        for row in await self.repo.machine_ids(ids):
            best = (row.body.get("candidates") or [{}])[0]
            background.machine_ids[row.observation_id] = MachineId(
                bool(row.body.get("rejected")), best.get("scientificName"), best.get("score")
            )
        names = {i.scientific_name for o in observations for i in o.identifications}
        names |= {o.scientific_name for o in observations if o.scientific_name}
        names |= {m.scientific_name for m in background.machine_ids.values() if m.scientific_name}
        matches = await self.knowledge.matches(names)
        taxa = {name: m.taxon for name, m in matches.items() if m.taxon is not None}
        wanted_taxa = {
            t.scientific_name
            for o in observations
            if o.scientific_name and (t := taxa.get(o.scientific_name)) is not None
        }
        background.taxa = await cached_or_loaded(
            self.cache.taxa,
            wanted_taxa,
            lambda missing: self.repo.accepted_records(missing, ACCEPTED_RECORDS_LIMIT),
            TaxonPoints.of,
        )
        observers = {o.recorded_by for o in observations if o.recorded_by}
        background.observers = await cached_or_loaded(
            self.cache.observers, observers, self.repo.observer_counts, lambda counts: counts
        )
        measured = sorted({o.recorded_by for o in observations if o.recorded_by and o.measurements})
        background.measurements = await self.repo.recent_measurements(
            measured,
            MEASUREMENT_HISTORY + 1,  # one more: the observation itself may be there
        )
        return background, matches, taxa

    async def _stored_photos(self, observations: Sequence[Observation]) -> dict[str, ImageFacts]:
        """Analyses kept from earlier assessments, by media id."""
        limit = self.settings.max_media_per_observation
        media_ids = sorted({m.id for o in observations for m in photos_of(o, limit) if m.id})
        rows = await self.repo.images(media_ids)
        return {media_id: ImageFacts(**row.facts) for media_id, row in rows.items()}

    def _photo_facts(
        self, obs: Observation, stored: Mapping[str, ImageFacts], photos: Photos
    ) -> tuple[Observation, dict[str, ImageFacts], dict[str, str]]:
        """The observation's photo analyses by media URL, what could not be fetched, and the
        observation with the EXIF read from its photos where it carried none."""
        facts: dict[str, ImageFacts] = {}
        unfetched: dict[str, str] = {}
        for media in photos_of(obs, self.settings.max_media_per_observation):
            assert media.url is not None
            known = stored.get(media.id or "") or photos.analysed.get(media.url)
            if known is not None:
                facts[media.url] = known
            elif media.url in photos.unfetched:
                unfetched[media.url] = photos.unfetched[media.url]
            else:
                raise PhotosChanged(media.url)
        if not facts:
            return obs, facts, unfetched
        with_exif = tuple(
            dataclasses.replace(
                m,
                exif_taken_at=read.exif_taken_at,
                exif_latitude=read.exif_latitude,
                exif_longitude=read.exif_longitude,
            )
            if _lacks_exif(m) and (read := facts.get(m.url or "")) is not None
            else m
            for m in obs.media
        )
        return dataclasses.replace(obs, media=with_exif), facts, unfetched

    @staticmethod
    def _index(obs: Observation, facts: Mapping[str, ImageFacts]) -> list[ImageRow]:
        """The rows that keep these analyses for later assessments and in the duplicate
        index."""
        if obs.id is None:
            return []
        rows = []
        for found in facts.values():
            if found.media_id is None:
                continue
            bands = _bands(found.phash) if found.phash is not None else [None] * 4
            rows.append(
                ImageRow(
                    media_id=found.media_id,
                    observation_id=obs.id,
                    recorded_by=obs.recorded_by,
                    facts=dataclasses.asdict(found),
                    phash=_signed(found.phash) if found.phash is not None else None,
                    band0=bands[0],
                    band1=bands[1],
                    band2=bands[2],
                    band3=bands[3],
                )
            )
        return rows

    async def _duplicate_candidates(self, facts: Sequence[ImageFacts]) -> list[IndexedPhoto]:
        """Indexed photos sharing a hash band with any of these: one query per batch."""
        bands = [_bands(f.phash) for f in facts if f.phash is not None]
        return await self.repo.images_sharing_a_band(bands, DUPLICATE_CANDIDATES_EACH)

    @staticmethod
    def _duplicates(
        obs: Observation,
        facts: Mapping[str, ImageFacts],
        candidates: DuplicateCandidates,
        max_distance: int,
    ) -> list[Duplicate]:
        """For each photo, the closest copy among other users' photos and among the
        observer's own (on other observations), each with how many copies there are: what
        the duplicates check tells. A photo copied thousands of times costs a few vector
        operations, not an object per copy."""
        found = []
        others = candidates.of_other_users(obs.recorded_by)
        elsewhere = candidates.observation_ids != obs.id  # its own photos, indexed earlier
        for item in facts.values():
            if item.phash is None:
                continue
            distances = images.hamming_all(item.phash, candidates.hashes)
            near = (distances <= max_distance) & elsewhere & (candidates.media_ids != item.media_id)
            kinds = [np.flatnonzero(near & others), np.flatnonzero(near & ~others)]
            # The kind met first among the candidates comes first, as one by one.
            for hits in sorted((h for h in kinds if h.size), key=lambda h: int(h[0])):
                i = int(hits[np.argmin(distances[hits])])
                other = candidates.photos[i]
                found.append(
                    Duplicate(
                        item.media_id,
                        other.observation_id,
                        other.media_id,
                        other.recorded_by,
                        int(distances[i]),
                        matches=int(hits.size),
                    )
                )
        return found

    # --- events -----------------------------------------------------------------------------

    async def seen(
        self, changes: Sequence[Change], *, for_update: bool = False
    ) -> dict[str, SeenObservation]:
        """What was seen of the observations ``changes`` touch (one read for them all)."""
        ids = sorted({c.observation_id for c in changes})
        return await self.repo.seen_many(ids, for_update=for_update)

    async def photos_to_fetch(self, bodies: Sequence[dict[str, Any]]) -> list[Media]:
        """Read side of events: the photos of these observations not analysed yet."""
        observations = [observation_from(ObservationIn.model_validate(b)) for b in bodies]
        return self.photos.wanted(observations, await self._stored_photos(observations))

    async def apply(self, changes: Sequence[Change], photos: Photos) -> None:
        """Write side of a batch of events, in one transaction: machine identifications kept,
        then each observation touched scored once, in the state all its changes leave it
        in (a creation and the updates that follow it score as one assessment of the latest
        version), its snapshot kept, ``observation.scored`` published."""
        for change in changes:
            if change.verdict is not None:
                await self._keep_machine_id(change.observation_id, change.verdict, change.when)
        prior = await self.seen(changes, for_update=True)
        states = settle_all(prior, changes)
        await self.observed_many(
            [s for s in states.values() if s.body is not None], photos, seen=prior
        )

    async def _keep_machine_id(
        self, observation_id: str, verdict: dict[str, Any], when: datetime
    ) -> None:
        prior = await self.repo.machine_id(observation_id)
        if prior is None or prior.identified_at.replace(tzinfo=UTC) <= when:
            await self.repo.save_machine_id(
                MachineIdRow(observation_id=observation_id, body=verdict, identified_at=when)
            )

    async def observed_many(
        self, states: Sequence[Settled], photos: Photos, *, seen: Mapping[str, SeenObservation]
    ) -> None:
        """Observations created or changed: keep their snapshots (``seen``: what was seen of
        them, read and locked in this transaction), score them, publish; a few statements
        for the whole batch."""
        if not states:
            return
        data = [ObservationIn.model_validate(state.body) for state in states]
        assessed = await self.assess_many(data, record=True, photos=photos, seen=seen)
        snapshots: list[SeenObservation] = []
        assessments: list[AssessmentRow] = []
        created_at = datetime.now(UTC)
        for state, one, (assessment, obs, result) in zip(states, data, assessed, strict=True):
            assert state.body is not None
            match = await self.knowledge.match(obs.scientific_name) if obs.scientific_name else None
            taxon = result.community.name if result.community else None
            if taxon is None and match is not None and match.taxon is not None:
                taxon = match.taxon.scientific_name
            assert obs.id is not None
            snapshots.append(
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
                    body=state.body,
                    measurements=[m.model_dump() for m in one.measurements],
                    deleted=False,
                    updated_at=state.when,
                )
            )
            self.cache.changed([state.before[0], obs.recorded_by], [state.before[1], taxon])
            assessments.append(
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
                    created_at=created_at,
                )
            )
        await self.repo.save_seen_many(snapshots, seen)
        await self.repo.add_assessments(assessments)
        if self.events is not None:
            await self.events.emit_many(
                SCORED, [(f"observation/{a['observation_id']}", a) for a, _, _ in assessed]
            )

    async def deleted(self, observation_id: str) -> None:
        prior = await self.repo.seen(observation_id, for_update=True)
        if prior is not None:
            self.cache.changed([prior.recorded_by], [prior.taxon])
            await self.repo.delete_seen(prior)

    # --- reading ----------------------------------------------------------------------------

    async def history(self, observation_id: str) -> dict[str, Any]:
        rows = await self.repo.assessments(observation_id, self.settings.history_limit)
        if not rows:
            raise NotFound(f"No assessment of observation {observation_id}.")
        items = [assessment_of(row) for row in rows]
        return {"observation_id": observation_id, "latest": items[0], "history": items}

    async def ruleset(self, project: str) -> dict[str, Any]:
        row = await self.repo.latest_ruleset(project)
        body = stored_body(row)
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
            for param, value in check.params.items():
                if error := param_error(name, param, value):
                    raise InvalidParameter(
                        f"The parameter {param} of the check {name} {error}.",
                        check=name,
                        parameter=param,
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
        self.cache.rulesets.forget(project)
        return await self.ruleset(project)


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
