"""The grade, the iNaturalist way: an observation is *verifiable* with a date, a location
and media, when it is not captive or cultivated and no data-quality vote says otherwise;
a verifiable one is *research* grade once its community taxon — the deepest taxon that at
least two identifications support with more than 2/3 agreement, walking up the ranks when
the species do not agree — is a species or lower, else it *needs an id*."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from c4c.quality.rules.model import Finding, Grade, Identification, Observation
from c4c.shared.taxonomy import Taxon

QUALITY_METRICS = ("date", "location", "wild", "evidence", "recent", "subject")
SPECIES_OR_LOWER = frozenset(
    {"species", "hybrid", "subspecies", "variety", "form", "infrahybrid", "complex"}
)
NEEDS_ID_ANCESTOR_RANKS = frozenset({"family", "subfamily", "tribe", "subtribe", "genus"})
AGREEMENT = Fraction(2, 3)


@dataclass(frozen=True)
class CommunityTaxon:
    name: str
    rank: str
    supporting: int
    considered: int


def community_taxon(
    identifications: Sequence[Identification], taxon_of: Callable[[str], Taxon | None]
) -> CommunityTaxon | None:
    """The deepest taxon with ≥ 2 supporting identifications and > 2/3 agreement among
    those that are not mere ancestors of it; people's identifications only, each person's
    latest."""
    latest: dict[str, Identification] = {}
    for ident in identifications:
        if ident.kind == "human":
            latest[ident.identified_by] = ident
    paths: list[list[tuple[str, str]]] = []
    for ident in latest.values():
        taxon = taxon_of(ident.scientific_name)
        paths.append(taxon.ancestry() if taxon else [("unranked", ident.scientific_name)])
    best: tuple[int, CommunityTaxon] | None = None
    for path in paths:
        for depth, node in enumerate(path):
            supporting = sum(1 for p in paths if node in p)
            # Identifications of an ancestor of this node neither support nor contradict it.
            ancestors = sum(1 for p in paths if node not in p and p[-1] in path[:depth])
            considered = len(paths) - ancestors
            agreed = supporting >= 2 and Fraction(supporting, considered) > AGREEMENT
            if agreed and (best is None or depth > best[0]):
                best = (depth, CommunityTaxon(node[1], node[0], supporting, considered))
    return best[1] if best else None


@dataclass(frozen=True)
class GradeResult:
    grade: Grade
    community: CommunityTaxon | None
    findings: list[Finding]


def _vote_failed(votes: Mapping[str, Any]) -> bool:
    return int(votes.get("disagree", 0)) > int(votes.get("agree", 0))


def grade(
    obs: Observation,
    *,
    has_valid_date: bool,
    has_valid_location: bool,
    taxon_of: Callable[[str], Taxon | None],
    score: float,
    params: Mapping[str, Any],
) -> GradeResult:
    findings = []
    has_media = any(m.type in ("image", "audio", None) and m.url for m in obs.media)
    missing = [
        what
        for what, present in (
            ("date", has_valid_date),
            ("location", has_valid_location),
            ("media", has_media),
        )
        if not present
    ]
    if obs.captive:
        missing.append("wild")
    failed_votes = [
        metric for metric in QUALITY_METRICS if _vote_failed(obs.quality_votes.get(metric, {}))
    ]
    if failed_votes:
        findings.append(
            Finding(
                "QUALITY_VOTES_FAILED",
                "warning",
                "The community voted that the observation fails: " + ", ".join(failed_votes),
                {"metrics": failed_votes},
                0.0,
                None,
            )
        )
    community = community_taxon(obs.identifications, taxon_of)
    if missing or failed_votes:
        if missing:
            findings.append(
                Finding(
                    "NOT_VERIFIABLE",
                    "info",
                    "The observation is casual: it lacks " + ", ".join(missing) + ".",
                    {"missing": missing},
                    0.0,
                    None,
                )
            )
        return GradeResult("casual", community, findings)
    no_better_id = _vote_failed(obs.quality_votes.get("needs_id", {}))
    research = community is not None and (
        community.rank in SPECIES_OR_LOWER
        or (no_better_id and community.rank in NEEDS_ID_ANCESTOR_RANKS)
    )
    if research and score < params["research_min_score"]:
        findings.append(
            Finding(
                "SCORE_BELOW_RESEARCH",
                "info",
                f"The score {score:g} is below the project's {params['research_min_score']} "
                "for research grade.",
                {"score": score},
                0.0,
                None,
            )
        )
        research = False
    return GradeResult("research" if research else "needs_id", community, findings)
