"""What: the name against the taxonomic backbone, and the record's Darwin Core terms."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from c4c.quality.rules.model import Context, Finding, Observation

BASES_OF_RECORD = frozenset(
    {
        "HumanObservation",
        "MachineObservation",
        "MaterialSample",
        "LivingSpecimen",
        "PreservedSpecimen",
        "FossilSpecimen",
        "MaterialCitation",
        "Occurrence",
    }
)


def taxon_match(obs: Observation, ctx: Context, params: Mapping[str, Any]) -> list[Finding]:
    match = ctx.taxon_match
    if not obs.scientific_name or match is None:
        return []
    evidence: dict[str, Any] = {"scientificName": obs.scientific_name}
    if match.kind == "none":
        return [
            Finding(
                "TAXON_MATCH_NONE",
                "warning",
                "The name is not in the taxonomic backbone.",
                evidence,
                params["none_penalty"],
                "Check the spelling, or choose the name from the app's list.",
            )
        ]
    assert match.taxon is not None
    evidence |= {"matchedName": match.taxon.scientific_name, "matchedRank": match.taxon.rank}
    if match.kind == "fuzzy":
        return [
            Finding(
                "TAXON_MATCH_FUZZY",
                "warning",
                f"The name matches {match.taxon.scientific_name!r} only approximately.",
                {**evidence, "similarity": match.similarity},
                params["fuzzy_penalty"],
                f"Did you mean {match.taxon.scientific_name}?",
            )
        ]
    if match.kind == "higherrank":
        return [
            Finding(
                "TAXON_MATCH_HIGHERRANK",
                "info",
                f"Only the {match.taxon.rank} {match.taxon.scientific_name} is known.",
                evidence,
                params["higherrank_penalty"],
                "Check the species part of the name.",
            )
        ]
    return []


def basis_of_record(obs: Observation, ctx: Context, params: Mapping[str, Any]) -> list[Finding]:
    if obs.basis_of_record is None or obs.basis_of_record in BASES_OF_RECORD:
        return []
    return [
        Finding(
            "BASIS_OF_RECORD_INVALID",
            "warning",
            "The basis of record is not one of Darwin Core's.",
            {"basisOfRecord": obs.basis_of_record, "allowed": sorted(BASES_OF_RECORD)},
            params["penalty"],
            None,
        )
    ]


def individual_count(obs: Observation, ctx: Context, params: Mapping[str, Any]) -> list[Finding]:
    count = obs.individual_count
    if count is None:
        return []
    valid = (
        isinstance(count, int) and not isinstance(count, bool) and 0 < count <= params["max_count"]
    )
    if valid:
        return []
    return [
        Finding(
            "INDIVIDUAL_COUNT_INVALID",
            "warning",
            f"The individual count must be a whole number from 1 to {params['max_count']}.",
            {"individualCount": count},
            params["penalty"],
            "Count the individuals you saw, or leave the count out.",
        )
    ]


def multimedia(obs: Observation, ctx: Context, params: Mapping[str, Any]) -> list[Finding]:
    findings = []
    for media in obs.media:
        reason = ctx.unfetched_media.get(media.url or "")
        if media.url is not None and reason is None:
            parts = urlsplit(media.url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                reason = "not an http(s) URL"
        if reason is not None:
            findings.append(
                Finding(
                    "MULTIMEDIA_URI_INVALID",
                    "warning",
                    f"A media URL cannot be used: {reason}.",
                    {"mediaId": media.id, "url": (media.url or "")[:500], "reason": reason},
                    params["penalty"],
                    None,
                )
            )
    return findings


def media_present(obs: Observation, ctx: Context, params: Mapping[str, Any]) -> list[Finding]:
    if any(m.url for m in obs.media):
        return []
    return [
        Finding(
            "MEDIA_MISSING",
            "warning",
            "The observation has no photo or sound, so nobody can confirm it.",
            {},
            params["penalty"],
            "Add a photo of the organism.",
        )
    ]
