"""Readers of bulk imports: what to enrol, from a folder of ``<Species_name>/*.jpg`` or a
Darwin Core Archive with a multimedia extension. No I/O beyond reading the source.

A folder may carry a ``species.csv`` (columns ``folder``, ``scientificName`` and optionally
``scientificNameAuthorship``, ``genus``, ``family``, ``vernacularName``, ``gbifID``,
``organ``) naming its folders; otherwise a folder's name is the species with ``_`` for
spaces (``Crocus_sp`` → ``Crocus sp.``).
"""

from __future__ import annotations

import csv
import io
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree.ElementTree import Element, ParseError

from defusedxml import ElementTree  # type: ignore[import-untyped]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
DWC = "http://rs.tdwg.org/dwc/terms/"
DC = "http://purl.org/dc/terms/"
MULTIMEDIA_ROW_TYPES = frozenset(
    {"http://rs.gbif.org/terms/1.0/Multimedia", "http://rs.tdwg.org/ac/terms/Multimedia"}
)
_META_NS = "{http://rs.tdwg.org/dwc/text/}"


class ImportSourceError(ValueError):
    """The source is not a readable folder or archive of the declared format."""


@dataclass(frozen=True)
class SpeciesInfo:
    scientific_name: str
    authorship: str | None = None
    genus: str | None = None
    family: str | None = None
    common_names: dict[str, list[str]] = field(default_factory=dict)
    gbif_id: str | None = None


@dataclass(frozen=True)
class ImportItem:
    species: SpeciesInfo
    organ: str
    name: str
    """Where the photo comes from: a path inside the source, or a URL."""
    author: str | None = None
    license: str | None = None


def _name_from_folder(folder: str) -> str:
    words = folder.replace("_", " ").split()
    if len(words) == 2 and words[1].lower() in {"sp", "spp"}:
        words[1] = words[1].lower() + "."
    return " ".join(words)


def _common_names(row: dict[str, str]) -> dict[str, list[str]]:
    name = (row.get("vernacularName") or "").strip()
    return {(row.get("language") or "en").strip() or "en": [name]} if name else {}


def folder_items(root: Path) -> Iterator[ImportItem]:
    if not root.is_dir():
        raise ImportSourceError(f"{root.name} is not a folder")
    named: dict[str, dict[str, str]] = {}
    listing = root / "species.csv"
    if listing.is_file():
        with listing.open(newline="", encoding="utf-8") as file:
            named = {row["folder"]: row for row in csv.DictReader(file) if row.get("folder")}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
        row = named.get(folder.name, {})
        species = SpeciesInfo(
            scientific_name=(row.get("scientificName") or _name_from_folder(folder.name)).strip(),
            authorship=row.get("scientificNameAuthorship") or None,
            genus=row.get("genus") or None,
            family=row.get("family") or None,
            common_names=_common_names(row),
            gbif_id=row.get("gbifID") or None,
        )
        for photo in sorted(folder.iterdir()):
            if photo.suffix.lower() in IMAGE_SUFFIXES and photo.is_file():
                yield ImportItem(
                    species, (row.get("organ") or "flower"), str(photo.relative_to(root))
                )


class DarwinCoreArchive:
    """A DwC-A as a zip file or an unpacked folder: ``meta.xml``, the core (occurrences or
    taxa, with ``scientificName``) and a multimedia extension whose ``identifier`` is a
    file in the archive or an http(s) URL."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self._zip = zipfile.ZipFile(source) if source.is_file() else None

    def read(self, name: str) -> bytes:
        if self._zip is not None:
            try:
                return self._zip.read(name)
            except KeyError as exc:
                raise ImportSourceError(f"{name} is not in the archive") from exc
        path = (self.source / name).resolve()
        if not path.is_relative_to(self.source.resolve()) or not path.is_file():
            raise ImportSourceError(f"{name} is not in the archive")
        return path.read_bytes()

    def _table(self, element: Element) -> tuple[list[dict[str, str]], str]:
        location = element.find(f"{_META_NS}files/{_META_NS}location")
        if location is None or not location.text:
            raise ImportSourceError("meta.xml names no data file")
        delimiter = (element.get("fieldsTerminatedBy") or ",").encode().decode("unicode_escape")
        skip = int(element.get("ignoreHeaderLines") or 0)
        columns: dict[int, str] = {}
        for f in element.findall(f"{_META_NS}field"):
            if f.get("index") is not None:
                columns[int(f.get("index", "0"))] = (f.get("term") or "").rsplit("/", 1)[-1]
        id_element = element.find(f"{_META_NS}id") or element.find(f"{_META_NS}coreid")
        id_index = int(id_element.get("index", "0")) if id_element is not None else 0
        text = self.read(location.text.strip()).decode("utf-8-sig")
        rows = []
        for values in list(csv.reader(io.StringIO(text), delimiter=delimiter))[skip:]:
            row = {term: values[i] for i, term in columns.items() if i < len(values)}
            row["_id"] = values[id_index] if id_index < len(values) else ""
            rows.append(row)
        return rows, element.get("rowType") or ""

    def items(self) -> Iterator[ImportItem]:
        try:
            meta = ElementTree.fromstring(self.read("meta.xml"))
        except ParseError as exc:
            raise ImportSourceError(f"meta.xml is not valid XML: {exc}") from exc
        core = meta.find(f"{_META_NS}core")
        if core is None:
            raise ImportSourceError("meta.xml has no core")
        core_rows, _ = self._table(core)
        by_id = {row["_id"]: row for row in core_rows}
        extensions = [
            e
            for e in meta.findall(f"{_META_NS}extension")
            if e.get("rowType") in MULTIMEDIA_ROW_TYPES
        ]
        if not extensions:
            raise ImportSourceError("the archive has no multimedia extension")
        media_rows, _ = self._table(extensions[0])
        for media in media_rows:
            core_row = by_id.get(media["_id"])
            identifier = (media.get("identifier") or media.get("accessURI") or "").strip()
            if core_row is None or not identifier or not core_row.get("scientificName"):
                continue
            fmt = (media.get("format") or "").lower()
            if fmt and not fmt.startswith("image/"):
                continue
            species = SpeciesInfo(
                scientific_name=core_row["scientificName"].strip(),
                authorship=core_row.get("scientificNameAuthorship") or None,
                genus=core_row.get("genus") or None,
                family=core_row.get("family") or None,
                common_names=_common_names(core_row),
                gbif_id=core_row.get("taxonKey") or None,
            )
            organ = (media.get("subjectPart") or media.get("description") or "").lower()
            yield ImportItem(
                species,
                organ
                if organ in {"leaf", "flower", "fruit", "bark", "habit", "other"}
                else "flower",
                identifier,
                author=media.get("creator") or media.get("rightsHolder") or None,
                license=media.get("license") or None,
            )
