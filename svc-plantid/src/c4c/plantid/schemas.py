# ruff: noqa: N815  (Pl@ntNet and Darwin Core field names are mixedCase by standard)
"""Request and response bodies: the management API (``/plantid/v1``) and the Pl@ntNet
API v2 shapes (``/v2``)."""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from c4c.plantid.models import ImportRow, ProjectRow, ReferenceRow, SpeciesRow
from c4c.plantid.service import IdentifyOutcome, ReferencePhoto
from c4c.shared.db import Utc, as_utc
from c4c.shared.text import Storable

ProjectId = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$", description="Slug: a-z, 0-9, '-'.")


class ProjectIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = ProjectId
    title: Annotated[Storable, Field(min_length=1, max_length=200)]
    description: Annotated[Storable, Field(max_length=5000)] | None = None


class ProjectOut(BaseModel):
    id: str
    title: str
    description: str | None
    galleryVersion: int
    speciesCount: int
    createdAt: Utc
    updatedAt: Utc

    @classmethod
    def of(cls, row: ProjectRow, species: int) -> ProjectOut:
        return cls(
            id=row.id,
            title=row.title,
            description=row.description,
            galleryVersion=row.gallery_version,
            speciesCount=species,
            createdAt=row.created_at,
            updatedAt=row.updated_at,
        )


class ReferenceOut(BaseModel):
    id: str
    project: str
    scientificName: str
    organ: str
    sha256: str
    width: int
    height: int
    author: str | None
    license: str | None
    modelVersion: str
    createdAt: Utc
    imageUrl: str

    @classmethod
    def of(cls, row: ReferenceRow) -> ReferenceOut:
        return cls(
            id=row.id,
            project=row.project_id,
            scientificName=row.scientific_name,
            organ=row.organ,
            sha256=row.sha256,
            width=row.width,
            height=row.height,
            author=row.author,
            license=row.license,
            modelVersion=row.model_version,
            createdAt=row.created_at,
            imageUrl=f"/plantid/v1/references/{row.id}/image",
        )


class EnrolmentOut(BaseModel):
    added: list[ReferenceOut]
    duplicates: int = Field(description="Photos the project already held (same bytes).")


class ReferencePage(BaseModel):
    items: list[ReferenceOut]
    total: int
    limit: int
    offset: int


class ImportIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["folder", "dwca"]
    source: Storable = Field(
        min_length=1,
        max_length=1000,
        description="Path under the import directory: a folder of <Species_name>/*.jpg, or "
        "a Darwin Core Archive (zip or unpacked folder).",
    )


class ImportOut(BaseModel):
    id: str
    project: str
    format: str
    source: str
    status: Literal["queued", "running", "finished", "failed"]
    total: int
    done: int
    skipped: int
    failed: int
    progress: float = Field(description="Share of the items handled, 0..1.")
    errors: list[dict[str, Any]]
    createdAt: Utc
    finishedAt: Utc | None

    @classmethod
    def of(cls, row: ImportRow) -> ImportOut:
        handled = row.done + row.skipped + row.failed
        return cls(
            id=row.id,
            project=row.project_id,
            format=row.format,
            source=row.source,
            status=row.status,
            total=row.total,
            done=row.done,
            skipped=row.skipped,
            failed=row.failed,
            progress=(handled / row.total) if row.total else float(row.status == "finished"),
            errors=row.errors or [],
            createdAt=row.created_at,
            finishedAt=row.finished_at,
        )


class GalleryOut(BaseModel):
    project: str
    version: str
    references: int
    species: list[str]
    rejectionThreshold: float
    temperature: float


# --- Pl@ntNet API v2 ------------------------------------------------------------------------


class PlantNetError(BaseModel):
    statusCode: int
    error: str
    message: str


class Taxon(BaseModel):
    scientificNameWithoutAuthor: str
    scientificNameAuthorship: str
    scientificName: str


class Species(Taxon):
    genus: Taxon
    family: Taxon
    commonNames: list[str]


class ImageUrls(BaseModel):
    o: str
    m: str
    s: str


class ImageDate(BaseModel):
    timestamp: int
    string: str


class RelatedImage(BaseModel):
    organ: str
    author: str
    license: str
    date: ImageDate
    citation: str
    url: ImageUrls


class Gbif(BaseModel):
    id: str


class Result(BaseModel):
    model_config = ConfigDict(json_schema_extra={"description": "A candidate species."})

    score: float
    species: Species
    gbif: Gbif | None = None
    images: list[RelatedImage] | None = None


class Query(BaseModel):
    project: str
    images: list[str]
    organs: list[str]
    includeRelatedImages: bool
    noReject: bool


class PredictedOrgan(BaseModel):
    image: str
    filename: str
    organ: str
    score: float


class IdentifyResponse(BaseModel):
    query: Query
    language: str
    preferedReferential: str
    bestMatch: str
    results: list[Result]
    version: str
    remainingIdentificationRequests: int
    predictedOrgans: list[PredictedOrgan] | None = None


def _taxon(name: str | None, authorship: str | None = None) -> Taxon:
    name = name or ""
    authorship = authorship or ""
    full = f"{name} {authorship}".strip()
    return Taxon(
        scientificNameWithoutAuthor=name, scientificNameAuthorship=authorship, scientificName=full
    )


def _species(name: str, row: SpeciesRow | None, language: str) -> Species:
    names = (row.common_names or {}) if row else {}
    return _species_of(
        name,
        row.authorship if row else None,
        (row.genus if row else None) or name.split()[0],
        row.family if row else None,
        tuple(names.get(language) or names.get("en") or ()),
    )


@functools.lru_cache(maxsize=4096)
def _species_of(
    name: str,
    authorship: str | None,
    genus: str,
    family: str | None,
    common_names: tuple[str, ...],
) -> Species:
    """Cached by what it shows: answers show the same few species again and again, and
    building one costs more than the rest of a result. (By value, not by row: a rebuilt
    flora's new rows of unchanged species hit, and no old row is kept alive.)"""
    base = _taxon(name, authorship)
    return Species(
        **base.model_dump(),
        genus=_taxon(genus),
        family=_taxon(family),
        commonNames=list(common_names),
    )


def _related(row: ReferencePhoto, base_url: str) -> RelatedImage:
    url = f"{base_url.rstrip('/')}/plantid/v1/references/{row.id}/image"
    created = as_utc(row.created_at)
    return RelatedImage(
        organ=row.organ,
        author=row.author or "",
        license=row.license or "",
        date=ImageDate(
            timestamp=int(created.timestamp() * 1000),
            string=created.date().isoformat(),
        ),
        citation=f"{row.author or 'unknown'} / {row.project_id}",
        url=ImageUrls(o=url, m=url, s=url),
    )


def identify_response(
    outcome: IdentifyOutcome,
    *,
    query: Query,
    filenames: list[str],
    language: str,
    remaining: int,
    service_version: str,
    base_url: str,
) -> IdentifyResponse:
    """The answer; ``base_url`` is read only for related images' links."""
    results = [
        Result(
            score=round(r.candidate.score, 5),
            species=_species(r.candidate.species, r.species, language),
            gbif=Gbif(id=r.species.gbif_id) if r.species and r.species.gbif_id else None,
            images=[_related(ref, base_url) for ref in r.related]
            if query.includeRelatedImages
            else None,
        )
        for r in outcome.ranked
    ]
    predicted = None
    if "auto" in query.organs:
        predicted = [
            PredictedOrgan(image=image, filename=filename, organ=organ, score=round(score, 3))
            for image, filename, (organ, score) in zip(
                query.images, filenames, outcome.identification.predicted_organs, strict=False
            )
        ]
    return IdentifyResponse(
        query=query,
        language=language,
        preferedReferential=outcome.project,
        bestMatch=results[0].species.scientificName if results else "",
        results=results,
        version=f"c4c-plantid {service_version} ({outcome.model_version}; "
        f"gallery {outcome.gallery_version})",
        remainingIdentificationRequests=remaining,
        predictedOrgans=predicted,
    )
