"""Domain logic of plant identification: floras (projects) and their reference photos,
identification against a project's gallery, quotas, bulk imports. No HTTP, no SQL: the
repository, the media storage, the engine and the photo fetcher are passed in.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from c4c.plantid import metrics, taxonomy
from c4c.plantid.engine.embedder import Embedder, ModelSpec, custom_model, default_model
from c4c.plantid.engine.gallery import Candidate, Gallery, Identification
from c4c.plantid.errors import (
    EmptyGallery,
    ImportNotFound,
    InvalidImportSource,
    ProjectExists,
    ProjectNotFound,
    QuotaExceeded,
    ReferenceNotFound,
)
from c4c.plantid.images import decode_photo, encode_jpeg
from c4c.plantid.imports import (
    DarwinCoreArchive,
    ImportItem,
    ImportSourceError,
    SpeciesInfo,
    folder_items,
)
from c4c.plantid.models import ImportRow, ProjectRow, ReferenceRow, SpeciesRow
from c4c.plantid.repository import Repository
from c4c.plantid.settings import PlantidSettings
from c4c.shared.problems import ProblemError
from c4c.shared.storage import LocalDiskStorage

log = logging.getLogger("c4c.plantid")

ORGANS = ("leaf", "flower", "fruit", "bark", "auto")
SECONDARY_ORGANS = ("habit", "other")
ALL_PROJECTS = "all"
Fetch = Callable[[str], Awaitable[bytes]]


def now() -> datetime:
    return datetime.now(UTC)


def utc_day(moment: datetime) -> str:
    return moment.date().isoformat()


def seconds_to_midnight(moment: datetime) -> int:
    tomorrow = datetime.combine(moment.date() + timedelta(days=1), datetime.min.time(), UTC)
    return max(int((tomorrow - moment).total_seconds()), 1)


@dataclass(frozen=True)
class Quota:
    limit: int
    used: int

    @property
    def remaining(self) -> int:
        return max(self.limit - self.used, 0)


@dataclass(frozen=True)
class GalleryKey:
    """Which gallery answers for ``project``: the gallery versions of the projects it spans
    (one, or all for 'all') and the model's version."""

    project: str
    versions: tuple[tuple[str, int], ...]
    model: str

    @property
    def version(self) -> str:
        spans = ",".join(f"{project}:{version}" for project, version in self.versions)
        return f"{self.project}/{spans}/{self.model}"


@dataclass(frozen=True)
class ReferencePhoto:
    """What an answer shows of a reference photo."""

    id: str
    project_id: str
    organ: str
    author: str | None
    license: str | None
    created_at: datetime

    @classmethod
    def of(cls, row: ReferenceRow) -> ReferencePhoto:
        return cls(row.id, row.project_id, row.organ, row.author, row.license, row.created_at)


@dataclass(frozen=True)
class Flora:
    """A gallery with the species metadata and reference photos answers show, cached
    together: identification reads nothing from the database after inference. Enrolment
    bumps the gallery version of every project whose species or photos it changes."""

    gallery: Gallery
    species: dict[str, SpeciesRow]
    photos: list[ReferencePhoto]
    """By gallery index."""


class SpeciesCounts:
    """How many species each project has references of, counted again only once its
    gallery version moved (every change to its references moves it): counting reads all of
    a project's references (295 ms for all projects at 300,000), and apps list the projects
    (``/v2/projects``) often."""

    def __init__(self) -> None:
        self._counted: dict[str, tuple[Hashable, int]] = {}
        """Project → (gallery version, species)."""

    async def of(
        self,
        versions: Mapping[str, Hashable],
        count: Callable[[Sequence[str]], Awaitable[Mapping[str, int]]],
    ) -> dict[str, int]:
        """Of the projects at these gallery versions (read before ``count`` runs: a count
        newer than its version is only counted again once more). The answer is made of what
        this call read and counted: a concurrent call may replace what is kept meanwhile."""
        known = {p: c for p in versions if (c := self._counted.get(p)) and c[0] == versions[p]}
        stale = [p for p in versions if p not in known]
        if stale:
            counted = await count(stale)
            known |= {p: (versions[p], counted.get(p, 0)) for p in stale}
        self._counted = known  # projects gone are forgotten
        return {p: species for p, (_, species) in known.items()}


class Engine:
    """The model and the galleries built with it, shared by every request of the process.
    The model is built (first start) and loaded on first use, in a worker thread; a gallery
    is rebuilt when its project's gallery version changes, so edits apply without a
    restart — in every replica, since the version lives in the database. A version read is
    trusted for ``gallery_check_seconds``; an edit through this replica drops it on commit."""

    def __init__(self, settings: PlantidSettings, storage: LocalDiskStorage) -> None:
        self.settings = settings
        self.storage = storage
        self._embedder: Embedder | None = None
        self._lock = asyncio.Lock()
        self._floras: dict[GalleryKey, Flora] = {}
        self._flora_locks: dict[str, asyncio.Lock] = {}
        self._versions: dict[str, tuple[int, float]] = {}
        """Gallery version by project, with when it was read (monotonic seconds)."""
        self.version_epoch = 0
        """Counts the edits committed here: a version read across one is not kept."""
        self.species_counts = SpeciesCounts()
        self.tasks: set[asyncio.Task[None]] = set()

    def _spec(self) -> ModelSpec:
        s = self.settings
        if s.model_path is not None:
            return custom_model(
                s.model_path,
                kind=s.model_kind,
                labels_file=s.model_labels,
                output=s.model_output,
                input_size=s.model_input_size,
                mean=s.model_mean,
                std=s.model_std,
            )
        return default_model(s.model_cache_dir)

    async def embedder(self) -> Embedder:
        if self._embedder is None:
            async with self._lock:
                if self._embedder is None:
                    spec = await asyncio.to_thread(self._spec)
                    self._embedder = await asyncio.to_thread(
                        Embedder, spec, workers=self.settings.workers
                    )
                    metrics.model_loaded(spec.version)
        return self._embedder

    async def embed_photos(self, photos: Sequence[bytes]) -> np.ndarray:
        """Decode (only as large as the model needs) and embed on one inference thread: one
        hop off the event loop per call."""
        return await self.start_embedding(await self.embedder(), photos)

    def start_embedding(
        self, embedder: Embedder, photos: Sequence[bytes]
    ) -> asyncio.Future[np.ndarray]:
        """``embed_photos``, handed to an inference thread at once."""
        return asyncio.get_running_loop().run_in_executor(
            embedder.pool, embed_photos, embedder, photos, self.settings.max_image_pixels
        )

    async def decode_and_embed(
        self, photos: Sequence[bytes]
    ) -> tuple[list[Image.Image], np.ndarray]:
        """The photos at storage size, and their embeddings made exactly as a query's are."""
        embedder = await self.embedder()
        max_pixels = self.settings.max_image_pixels

        def work() -> tuple[list[Image.Image], np.ndarray]:
            images = [decode_photo(photo, max_pixels=max_pixels) for photo in photos]
            return images, embed_photos(embedder, photos, max_pixels)

        return await asyncio.get_running_loop().run_in_executor(embedder.pool, work)

    def known_version(self, project: str) -> int | None:
        """The gallery version of ``project`` read recently enough to be trusted, if any."""
        known = self._versions.get(project)
        if known is None or time.monotonic() - known[1] > self.settings.gallery_check_seconds:
            return None
        return known[0]

    def note_version(self, project: str, version: int, epoch: int) -> None:
        """Remember a version read from the database, unless an edit was committed here since
        the read began (``epoch``: ``version_epoch`` then): it may predate that edit."""
        if epoch == self.version_epoch:
            self._versions[project] = (version, time.monotonic())

    def galleries_changed(self, project: str | None = None) -> None:
        """An edit of ``project``'s gallery (None: of any project's) was committed."""
        self.version_epoch += 1
        if project is None:
            self._versions.clear()
        else:
            self._versions.pop(project, None)

    def has_flora(self, project: str) -> bool:
        """Whether a flora of ``project`` is cached (of any version)."""
        return any(key.project == project for key in self._floras)

    def forget(self, project: str) -> None:
        """Drop the cached flora of ``project`` (replaced by a newer version, or deleted)."""
        self._floras = {k: f for k, f in self._floras.items() if k.project != project}

    async def flora(self, key: GalleryKey, sessions: Callable[[], Any]) -> Flora:
        """The flora of ``key``, built from the database unless cached. References made with
        another model are re-embedded (and stored) first. The fit (and any re-embedding)
        runs outside a transaction: with SQLite, one holds the database's only writer."""
        cached = self._floras.get(key)
        if cached is not None:
            return cached
        lock = self._flora_locks.setdefault(key.project, asyncio.Lock())
        async with lock:
            if key in self._floras:
                return self._floras[key]
            embedder = await self.embedder()
            async with sessions() as session, session.begin():
                repo = Repository(session)
                references = await repo.gallery_rows([project for project, _ in key.versions])
                species = await repo.get_species([r.scientific_name for r in references])
            if not references:
                raise EmptyGallery("Enrol reference photos of the flora before identifying.")
            stale = [r for r in references if r.model_version != embedder.version]
            if stale:
                fresh = await self._reembed(stale)
                async with sessions() as session, session.begin():
                    await Repository(session).set_embeddings(fresh, embedder.version)
                refreshed = dict(fresh)
                vectors = [refreshed.get(r.id, r.embedding) for r in references]
            else:
                vectors = [r.embedding for r in references]
            s = self.settings
            gallery = await asyncio.to_thread(
                Gallery.fit,
                key.version,
                np.stack([np.frombuffer(v, dtype=np.float32) for v in vectors]),
                [r.scientific_name for r in references],
                [r.organ for r in references],
                [r.id for r in references],
                ridge=s.ridge,
                reject_quantile=s.reject_quantile,
                reject_similarity=s.reject_similarity,
            )
            flora = Flora(gallery, species, [ReferencePhoto.of(r) for r in references])
            self.forget(key.project)  # one flora per project: older versions go
            self._floras[key] = flora
            return flora

    async def _reembed(self, stale: Sequence[ReferenceRow]) -> list[tuple[str, bytes]]:
        """Embeddings of references made with another model, from their stored photos."""
        out = []
        for row in stale:
            path = self.storage.local_path(row.media_key)
            assert path is not None
            photo = await asyncio.to_thread(path.read_bytes)
            vector = (await self.embed_photos([photo]))[0]
            out.append((row.id, vector.astype(np.float32).tobytes()))
        log.info("re-embedded references", extra={"count": len(out)})
        return out

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self._embedder is not None:
            self._embedder.close()


@dataclass(frozen=True)
class RankedSpecies:
    candidate: Candidate
    species: SpeciesRow | None
    related: list[ReferencePhoto] = field(default_factory=list)


@dataclass(frozen=True)
class IdentifyOutcome:
    project: str
    identification: Identification
    ranked: list[RankedSpecies]
    model_version: str
    gallery_version: str

    @property
    def rejected(self) -> bool:
        return self.identification.rejected


class PlantidService:
    def __init__(self, repo: Repository, engine: Engine, settings: PlantidSettings) -> None:
        self.repo = repo
        self.engine = engine
        self.settings = settings

    # --- projects ---------------------------------------------------------------------------
    async def create_project(
        self, project_id: str, title: str, description: str | None
    ) -> ProjectRow:
        if project_id == ALL_PROJECTS or await self.repo.get_project(project_id) is not None:
            raise ProjectExists(f"The project {project_id!r} exists already.")
        moment = now()
        row = ProjectRow(
            id=project_id,
            title=title,
            description=description,
            gallery_version=0,
            created_at=moment,
            updated_at=moment,
        )
        await self.repo.add_project(row)
        return row

    async def project(self, project_id: str) -> ProjectRow:
        row = await self.repo.get_project(project_id)
        if row is None:
            raise ProjectNotFound(f"There is no project {project_id!r}.")
        return row

    async def projects(self) -> tuple[Sequence[ProjectRow], dict[str, int]]:
        """The projects, and how many species each has references of."""
        rows = await self.repo.list_projects()
        # A project deleted and made anew starts its versions again: its creation tells.
        versions = {row.id: (row.created_at, row.gallery_version) for row in rows}
        return rows, await self.engine.species_counts.of(versions, self.repo.species_counts)

    async def delete_project(self, project_id: str) -> None:
        await self.project(project_id)
        await self.repo.delete_project(project_id)
        self.repo.on_commit(lambda: self.engine.galleries_changed(project_id))

    async def _bump_gallery(self, project_id: str) -> None:
        await self.repo.bump_gallery(project_id)
        self.repo.on_commit(lambda: self.engine.galleries_changed(project_id))

    # --- references -------------------------------------------------------------------------
    async def _species(self, info: SpeciesInfo) -> SpeciesRow:
        name = taxonomy.canonical_name(info.scientific_name)
        row = (await self.repo.get_species([name])).get(name)
        described = _described(row) if row is not None else None
        if row is None:
            taxon = await asyncio.to_thread(taxonomy.lookup, name)
            row = SpeciesRow(
                scientific_name=name,
                taxon_rank=taxon.rank if taxon else None,
                genus=taxon.genus if taxon else None,
                family=taxon.family if taxon else None,
                inat_id=taxon.inat_id if taxon else None,
                common_names={},
            )
        # What the enrolment states wins over the taxonomy's guess.
        row.authorship = info.authorship or row.authorship
        row.genus = info.genus or row.genus or name.split()[0]
        row.family = info.family or row.family
        row.gbif_id = info.gbif_id or row.gbif_id
        names = dict(row.common_names or {})
        for language, values in info.common_names.items():
            names[language] = sorted(set(names.get(language, [])) | set(values))
        row.common_names = names
        await self.repo.save_species(row)
        if described is not None and _described(row) != described:
            await self.repo.bump_galleries_holding(name)  # their cached floras show it
            self.repo.on_commit(self.engine.galleries_changed)
        return row

    async def enrol(
        self,
        project_id: str,
        info: SpeciesInfo,
        organ: str,
        photos: Sequence[bytes],
        *,
        author: str | None = None,
        license: str | None = None,
    ) -> tuple[list[ReferenceRow], int]:
        """Add reference photos of one species; (new references, duplicates skipped)."""
        embedder = await self.engine.embedder()
        images, vectors = await self.engine.decode_and_embed(photos)  # before any statement
        await self.project(project_id)
        species = await self._species(info)
        added, duplicates = [], 0
        for photo, image, vector in zip(photos, images, vectors, strict=True):
            jpeg = await asyncio.to_thread(encode_jpeg, image)
            staged = await self.engine.storage.stage(_once(jpeg), max_bytes=len(jpeg))
            key = await self.engine.storage.commit(staged)
            row = ReferenceRow(
                id=str(uuid.uuid4()),
                project_id=project_id,
                scientific_name=species.scientific_name,
                organ=organ,
                sha256=hashlib.sha256(photo).hexdigest(),
                media_key=key,
                width=image.width,
                height=image.height,
                author=author,
                license=license,
                embedding=vector.astype(np.float32).tobytes(),
                model_version=embedder.version,
                created_at=now(),
            )
            if await self.repo.add_reference(row):
                added.append(row)
            else:
                duplicates += 1
        if added:
            await self._bump_gallery(project_id)
        return added, duplicates

    async def references(
        self, project_id: str, *, species: str | None, limit: int, offset: int
    ) -> tuple[Sequence[ReferenceRow], int]:
        await self.project(project_id)
        return await self.repo.list_references(
            project_id,
            species=taxonomy.canonical_name(species) if species else None,
            limit=limit,
            offset=offset,
        )

    async def reference(self, reference_id: str) -> ReferenceRow:
        row = await self.repo.get_reference(reference_id)
        if row is None:
            raise ReferenceNotFound(f"There is no reference {reference_id!r}.")
        return row

    async def delete_reference(self, reference_id: str) -> None:
        row = await self.reference(reference_id)
        await self.repo.delete_reference(reference_id)
        await self._bump_gallery(row.project_id)
        # The photo file stays: another project may hold the same bytes, and a file without
        # a row costs only disk (content-addressed, so a re-enrolment reuses it).

    # --- identification ---------------------------------------------------------------------
    async def gallery_key(self, project_id: str) -> GalleryKey:
        embedder = await self.engine.embedder()
        versions = await self.repo.gallery_versions(
            None if project_id == ALL_PROJECTS else project_id
        )
        if project_id != ALL_PROJECTS and not versions:
            raise ProjectNotFound(f"There is no project {project_id!r}.")
        return GalleryKey(project_id, tuple(sorted(versions.items())), embedder.version)

    # --- imports ----------------------------------------------------------------------------
    async def start_import(self, project_id: str, fmt: str, source: str) -> ImportRow:
        await self.project(project_id)
        resolve_import_source(self.settings, source)
        row = ImportRow(
            id=str(uuid.uuid4()),
            project_id=project_id,
            format=fmt,
            source=source,
            status="queued",
            total=0,
            done=0,
            skipped=0,
            failed=0,
            errors=[],
            created_at=now(),
        )
        await self.repo.add_import(row)
        return row

    async def get_import(self, import_id: str) -> ImportRow:
        row = await self.repo.get_import(import_id)
        if row is None:
            raise ImportNotFound(f"There is no import {import_id!r}.")
        return row


@dataclass
class _Lease:
    """Identifications charged to one caller for one day ahead of use."""

    used: int
    """The caller's count in the database once they were charged."""
    unused: int
    """How many of them this process has not handed out yet."""


class QuotaLedger:
    """Callers' daily quotas, charged to the database ahead of use, in blocks of up to
    ``quota_block`` (at most an eighth of what is left, so the last ones go one by one), then
    handed out from memory: one write per block rather than one per request. Counts are
    durable before use, so the quota is never exceeded and a restart forgets none; a clean
    shutdown gives the unused ones back, a crash loses at most a block per caller (refused
    early), and other replicas' unused blocks show as used."""

    def __init__(self, sessions: Callable[[], Any], settings: PlantidSettings) -> None:
        self.sessions = sessions
        self.settings = settings
        self._leases: dict[tuple[str, str], _Lease] = {}
        self._lock = asyncio.Lock()  # one charge to the database at a time: they are rare

    async def charge(self, caller: str, moment: datetime) -> Quota:
        """One identification for ``caller``: what is left of the quota once charged, or
        QuotaExceeded."""
        key = (caller, utc_day(moment))
        lease = self._leases.get(key)
        if lease is None or not lease.unused:
            async with self._lock:
                lease = self._leases.get(key)
                if lease is None or not lease.unused:
                    lease = await self._reserve(key, lease, moment)
        lease.unused -= 1  # no await since the check: no other request came between
        return Quota(self.settings.daily_quota, lease.used - lease.unused)

    async def _reserve(
        self, key: tuple[str, str], spent: _Lease | None, moment: datetime
    ) -> _Lease:
        limit = self.settings.daily_quota
        caller, day = key
        known = spent.used if spent is not None else 0
        block = max(1, min(self.settings.quota_block, (limit - known) // 8))
        async with self.sessions() as session, session.begin():
            repo = Repository(session)
            used = await repo.use_quota(caller, day, limit, block)
            if used is None and block > 1:  # others used some meanwhile: what is left, one
                block, used = 1, await repo.use_quota(caller, day, limit, 1)
        if used is None:
            raise quota_exceeded(limit, moment)
        # Leases of other days are void: their windows ended.
        self._leases = {k: lease for k, lease in self._leases.items() if k[1] == day}
        self._leases[key] = lease = _Lease(used, block)
        return lease

    async def quota(self, caller: str, moment: datetime) -> Quota:
        """``caller``'s quota today, without what this process holds unused."""
        day = utc_day(moment)
        async with self._lock:  # no block charged between the two reads
            async with self.sessions() as session:
                used = await Repository(session).quota_used(caller, day)
            lease = self._leases.get((caller, day))
        return Quota(self.settings.daily_quota, used - (lease.unused if lease else 0))

    async def close(self) -> None:
        """Give back what was charged ahead and not used (today's)."""
        async with self._lock:  # no block charged meanwhile would be left out
            day = utc_day(now())
            unused = [(k[0], lease.unused) for k, lease in self._leases.items() if k[1] == day]
            self._leases.clear()
        unused = [(caller, amount) for caller, amount in unused if amount]
        if not unused:
            return
        try:
            async with self.sessions() as session, session.begin():
                repo = Repository(session)
                for caller, amount in unused:
                    await repo.release_quota(caller, day, amount)
        except Exception:  # as after a crash: those callers lose what they were charged ahead
            log.warning("unused quota not given back", exc_info=True)


def quota_exceeded(limit: int, moment: datetime) -> QuotaExceeded:
    return QuotaExceeded(
        f"The daily quota of {limit} identifications is used up; it resets at 00:00 UTC.",
        headers=rate_limit_headers(Quota(limit, limit), moment, exceeded=True),
    )


class Identifier:
    """Identification as requests and observation events ask for it, with the fewest
    database round trips: usually none. The caller's quota is charged from the ledger's
    block, and the gallery version is read again only once ``gallery_check_seconds`` passed
    (or an edit here dropped it), in a short read before inference; after
    inference none, unless the flora changed and must be rebuilt (or a classifier model names
    species, whose metadata is read then).

    Inference does not wait for that admission when it will most likely pass — a project
    whose flora is cached, a caller not yet refused today: both run at once, and a refusal
    drops the inference's result. Otherwise (a first request, an unknown project, a caller
    out of quota) nothing is inferred before admission passes."""

    def __init__(
        self, sessions: Callable[[], Any], engine: Engine, settings: PlantidSettings
    ) -> None:
        self.sessions = sessions
        self.engine = engine
        self.settings = settings
        self.ledger = QuotaLedger(sessions, settings)
        self._refused: set[tuple[str, str]] = set()
        """(caller, UTC day) whose quota was found used up."""

    def _service(self, session: Any) -> PlantidService:
        return PlantidService(Repository(session), self.engine, self.settings)

    async def identify(
        self,
        project_id: str,
        photos: Sequence[bytes],
        organs: Sequence[str],
        *,
        caller: str | None = None,
        moment: datetime | None = None,
        results: int = 10,
        related_images: bool = False,
    ) -> tuple[IdentifyOutcome, Quota | None]:
        """The ranked species of one plant's photos, counted in the metrics, and what is left
        of ``caller``'s quota once this identification is charged to it (None: no caller,
        nothing charged). An unknown project charges nothing."""
        embedder = await self.engine.embedder()
        classifier = embedder.spec.kind == "classifier"
        moment = moment or now()
        started = time.perf_counter()
        early = (caller is None or (caller, utc_day(moment)) not in self._refused) and (
            classifier or self.engine.has_flora(project_id)
        )
        inference = self.engine.start_embedding(embedder, photos) if early else None
        try:
            try:
                key, quota = await self._admit(project_id, caller, moment, classifier)
            except BaseException:
                if inference is not None:
                    _abandon(inference)
                raise
            vectors = await (inference or self.engine.embed_photos(photos))
            if key is None:
                outcome = await self._classify(project_id, vectors, results)
            else:
                outcome = await self._match(key, vectors, organs, results, related_images)
        except QuotaExceeded:
            raise  # refused before identifying: not an identification
        except ProjectNotFound:
            metrics.failed(metrics.UNKNOWN_PROJECT)
            raise
        except ProblemError:
            metrics.failed(project_id)
            raise
        metrics.identified(
            project_id, rejected=outcome.rejected, seconds=time.perf_counter() - started
        )
        return outcome, quota

    async def _admit(
        self, project_id: str, caller: str | None, moment: datetime, classifier: bool
    ) -> tuple[GalleryKey | None, Quota | None]:
        """The gallery (None: a classifier needs none) and the caller's charged quota. An
        unknown project is refused before a used-up quota, and charges nothing."""
        key = None if classifier else await self._gallery_key(project_id)
        if caller is None:
            return key, None
        try:
            return key, await self.ledger.charge(caller, moment)
        except QuotaExceeded:
            day = utc_day(moment)
            self._refused = {entry for entry in self._refused if entry[1] == day}
            self._refused.add((caller, day))
            raise

    async def _gallery_key(self, project_id: str) -> GalleryKey:
        if project_id != ALL_PROJECTS:
            version = self.engine.known_version(project_id)
            if version is not None:
                embedder = await self.engine.embedder()
                return GalleryKey(project_id, ((project_id, version),), embedder.version)
        epoch = self.engine.version_epoch
        try:
            async with self.sessions() as session:
                key = await self._service(session).gallery_key(project_id)
        except ProjectNotFound:
            self.engine.forget(project_id)  # no more inference started early for it
            raise
        if project_id != ALL_PROJECTS:
            self.engine.note_version(project_id, key.versions[0][1], epoch)
        return key

    async def gallery(self, project_id: str) -> Gallery:
        key = await self._gallery_key(project_id)
        return (await self.engine.flora(key, self.sessions)).gallery

    async def _match(
        self,
        key: GalleryKey,
        vectors: np.ndarray,
        organs: Sequence[str],
        results: int,
        related_images: bool,
    ) -> IdentifyOutcome:
        """Against the project's gallery."""
        flora = await self.engine.flora(key, self.sessions)  # rebuilt when its version changed
        gallery = flora.gallery
        # The nearest references only show as related images.
        identification = gallery.identify(
            vectors, organs, nearest=3 if related_images else 0, limit=results
        )
        ranked = [
            RankedSpecies(
                candidate,
                flora.species.get(candidate.species),
                [flora.photos[i] for i in candidate.nearest] if related_images else [],
            )
            for candidate in identification.candidates
        ]
        return IdentifyOutcome(key.project, identification, ranked, key.model, gallery.version)

    async def _classify(self, project_id: str, scores: np.ndarray, results: int) -> IdentifyOutcome:
        """A classifier model: its own labels, no gallery; 'not found' below a score."""
        embedder = await self.engine.embedder()
        probabilities = scores.mean(axis=0)
        order = np.argsort(-probabilities)[:results]
        labels = embedder.spec.labels
        candidates = [Candidate(labels[i], float(probabilities[i]), ()) for i in order]
        best = float(probabilities[order[0]])
        identification = Identification(
            candidates,
            best,
            self.settings.classifier_min_score,
            best < self.settings.classifier_min_score,
        )
        async with self.sessions() as session, session.begin():
            species = await Repository(session).get_species([c.species for c in candidates])
        ranked = [RankedSpecies(c, species.get(c.species)) for c in candidates]
        return IdentifyOutcome(project_id, identification, ranked, embedder.version, "classifier")


def _described(row: SpeciesRow) -> tuple[Any, ...]:
    """What an answer shows of a species."""
    return (row.authorship, row.genus, row.family, row.gbif_id, row.common_names, row.taxon_rank)


def resolve_import_source(settings: PlantidSettings, relative: str) -> Path:
    """A source inside the import directory: imports never read elsewhere on the server."""
    root = settings.resolved_import_dir.resolve()
    try:
        path = (root / relative).resolve()
        found = path.is_relative_to(root) and path.exists()
    except (OSError, ValueError):  # a NUL byte, a name too long for the file system
        found = False
    if not found:
        raise InvalidImportSource(
            f"{relative!r} is not a folder or file under the import directory.",
        )
    return path


def rate_limit_headers(quota: Quota, moment: datetime, *, exceeded: bool = False) -> dict[str, str]:
    """IETF RateLimit header fields (draft-ietf-httpapi-ratelimit-headers): the policy and
    what is left of it, with the seconds until the daily window resets."""
    reset = seconds_to_midnight(moment)
    headers = {
        "RateLimit-Policy": f'"daily";q={quota.limit};w=86400',
        "RateLimit": f'"daily";r={quota.remaining};t={reset}',
    }
    if exceeded:
        headers["Retry-After"] = str(reset)
    return headers


def _abandon(task: asyncio.Future[Any]) -> None:
    """Stop waiting for ``task``; what it ends with is dropped, without a warning."""
    task.cancel()
    task.add_done_callback(lambda done: done.cancelled() or done.exception())


def embed_photos(embedder: Embedder, photos: Sequence[bytes], max_pixels: int) -> np.ndarray:
    """What identification sees of photos (blocking). References and queries both go through
    here, so that their embeddings are comparable."""
    size = embedder.spec.input_size
    return embedder.embed([decode_photo(p, max_pixels=max_pixels, cover=size) for p in photos])


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


class ImportRunner:
    """Runs a bulk import in the background, enrolling in batches: each batch commits its
    references and the import's progress together, and bumps the gallery version. Photos
    already enrolled (same bytes) count as skipped, so a re-run after a crash resumes."""

    BATCH = 16

    def __init__(
        self,
        sessions: Callable[[], Any],
        engine: Engine,
        settings: PlantidSettings,
        fetch: Fetch,
    ) -> None:
        self.sessions = sessions
        self.engine = engine
        self.settings = settings
        self.fetch = fetch

    async def start(self, import_id: str) -> None:
        task = asyncio.create_task(self.run(import_id), name=f"plantid-import:{import_id}")
        self.engine.tasks.add(task)
        task.add_done_callback(self.engine.tasks.discard)

    async def resume(self) -> int:
        """Start again the imports a stop interrupted (already enrolled photos are skipped)."""
        async with self.sessions() as session:
            unfinished = [row.id for row in await Repository(session).unfinished_imports()]
        for import_id in unfinished:
            await self.start(import_id)
        return len(unfinished)

    async def _service(self, session: Any) -> PlantidService:
        return PlantidService(Repository(session), self.engine, self.settings)

    async def run(self, import_id: str) -> None:
        async with self.sessions() as session, session.begin():
            job = await (await self._service(session)).get_import(import_id)
            project_id, fmt, source = job.project_id, job.format, job.source
        try:
            path = resolve_import_source(self.settings, source)
            archive = DarwinCoreArchive(path) if fmt == "dwca" else None
            items = list(archive.items() if archive else folder_items(path))
        except (ImportSourceError, ProblemError, OSError, ValueError) as exc:
            await self._finish(import_id, "failed", [{"item": source, "error": str(exc)}])
            return
        # From zero on every (re)start: photos enrolled by an interrupted run count as skipped.
        await self._progress(
            import_id, status="running", total=len(items), done=0, skipped=0, failed=0
        )
        errors: list[dict[str, str]] = []
        for start in range(0, len(items), self.BATCH):
            batch = items[start : start + self.BATCH]
            done = skipped = failed = 0
            async with self.sessions() as session, session.begin():
                service = await self._service(session)
                for item in batch:
                    try:
                        data = await self._read(item, path, archive)
                        added, duplicates = await service.enrol(
                            project_id,
                            item.species,
                            item.organ,
                            [data],
                            author=item.author,
                            license=item.license,
                        )
                        done += len(added)
                        skipped += duplicates
                    except (ProblemError, ImportSourceError, OSError) as exc:
                        failed += 1
                        errors.append(
                            {"item": item.name, "error": getattr(exc, "detail", None) or str(exc)}
                        )
                job = await service.get_import(import_id)
                job.done += done
                job.skipped += skipped
                job.failed += failed
                job.errors = errors[-100:]
        await self._finish(import_id, "finished", errors[-100:])

    async def _read(self, item: ImportItem, root: Path, archive: DarwinCoreArchive | None) -> bytes:
        if item.name.startswith(("http://", "https://")):
            return await self.fetch(item.name)
        if archive is not None:
            return await asyncio.to_thread(archive.read, item.name)
        return await asyncio.to_thread((root / item.name).read_bytes)

    async def _progress(self, import_id: str, **values: Any) -> None:
        async with self.sessions() as session, session.begin():
            job = await (await self._service(session)).get_import(import_id)
            for name, value in values.items():
                setattr(job, name, value)

    async def _finish(self, import_id: str, status: str, errors: list[dict[str, str]]) -> None:
        await self._progress(import_id, status=status, errors=errors, finished_at=now())
