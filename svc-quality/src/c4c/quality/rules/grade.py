"""The grade, the iNaturalist way: an observation is *verifiable* with a date, a location
and media, when it is not captive or cultivated and no data-quality vote says otherwise;
a verifiable one is *research* grade once its community taxon — the deepest taxon that at
least two identifications support with more than 2/3 agreement, walking up the ranks when
the species do not agree — is a species or lower, else it *needs an id*."""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from c4c.quality.rules.model import Finding, Grade, Identification, Observation
from c4c.shared.taxonomy import Taxon

QUALITY_METRICS = ("date", "location", "wild", "evidence", "recent", "subject")
SPECIES_OR_LOWER = frozenset(
    {"species", "hybrid", "subspecies", "variety", "form", "infrahybrid", "complex"}
)
NEEDS_ID_ANCESTOR_RANKS = frozenset({"family", "subfamily", "tribe", "subtribe", "genus"})
MIN_SUPPORTING = 2


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
    if len(latest) < MIN_SUPPORTING:
        return None
    paths = tuple(
        taxon.ancestry() if (taxon := taxon_of(ident.scientific_name)) else _unranked(ident)
        for ident in latest.values()
    )
    return _agreed(paths)


def _unranked(ident: Identification) -> tuple[tuple[str, str], ...]:
    return (("unranked", ident.scientific_name),)


@functools.lru_cache(maxsize=8192)
def _agreed(paths: tuple[tuple[tuple[str, str], ...], ...]) -> CommunityTaxon | None:
    """The community taxon of identifications given as ancestries (cached: the same few
    combinations of names recur across observations)."""
    members = [frozenset(p) for p in paths]
    support = Counter(node for m in members for node in m)
    leaves = [(p[-1], m) for p, m in zip(paths, members, strict=True)]
    best: tuple[int, CommunityTaxon] | None = None
    for path in paths:
        for depth, node in enumerate(path):
            supporting = support[node]
            if supporting < MIN_SUPPORTING or (best is not None and depth <= best[0]):
                continue
            # Identifications of an ancestor of this node neither support nor contradict it.
            above = path[:depth]
            ancestors = sum(1 for leaf, m in leaves if node not in m and leaf in above)
            considered = len(paths) - ancestors
            if 3 * supporting > 2 * considered:  # more than 2/3 agreement, in integers
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
