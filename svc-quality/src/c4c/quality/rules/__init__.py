"""The checks, each a small pure rule, and the engine that runs a project's rule set over
an observation: score = 100 - the weighted penalties of every flag raised, and the grade.

A rule set enables, weights and parameterises checks by name; what it leaves out takes
the defaults below (version 0 is the built-in rule set)."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from c4c.quality.rules import dates, evidence, location, plausibility, record
from c4c.quality.rules.grade import CommunityTaxon, grade
from c4c.quality.rules.model import Context, Finding, Flag, Grade, Observation

Rule = Callable[[Observation, Context, Mapping[str, Any]], list[Finding]]
log = logging.getLogger("c4c.quality")


@dataclass(frozen=True)
class Check:
    rule: Rule
    params: Mapping[str, Any]
    description: str
    bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    """The allowed range of each numeric parameter that is not a penalty (penalties are
    0 to 100); a parameter is whole when its default is."""


CHECKS: dict[str, Check] = {
    "coordinates": Check(
        location.coordinates,
        {
            "missing_penalty": 20,
            "out_of_range_penalty": 30,
            "zero_penalty": 30,
            "swapped_penalty": 0,
        },
        "Coordinates present, on Earth, not 0/0.",
    ),
    "country": Check(
        location.country,
        {"presumed_penalty": 25, "mismatch_penalty": 10},
        "The point lies in the stated country; negated or swapped coordinates named.",
    ),
    "coordinate_precision": Check(
        location.precision,
        {
            "min_decimals": 3,
            "rounded_penalty": 3,
            "max_uncertainty_m": 10_000,
            "uncertainty_invalid_penalty": 5,
            "uncertainty_large_penalty": 5,
        },
        "Coordinates precise enough; uncertainty valid and not too large.",
        {"min_decimals": (0, 15), "max_uncertainty_m": (0, location.EARTH_HALF_CIRCUMFERENCE_M)},
    ),
    "recorded_date": Check(
        dates.recorded_date,
        {
            "missing_penalty": 20,
            "invalid_penalty": 25,
            "unlikely_penalty": 25,
            "earliest_year": 1600,
            "future_tolerance_hours": 24,
            "max_period_days": 31,
            "imprecise_penalty": 3,
        },
        "The date is a real date, not in the future nor before 1600, and precise.",
        {
            "earliest_year": (1, 9999),
            "future_tolerance_hours": (0, 24 * 366),
            "max_period_days": (0, 3_660_000),
        },
    ),
    "exif_date": Check(
        dates.exif_date,
        {"max_days": 2, "penalty": 10},
        "The photos' capture dates agree with the stated date.",
        {"max_days": (0, 36_600)},
    ),
    "exif_location": Check(
        evidence.exif_location,
        {"max_km": 5.0, "penalty": 10},
        "The photos' GPS positions agree with the stated position.",
        {"max_km": (0, location.EARTH_HALF_CIRCUMFERENCE_M / 1000)},
    ),
    "taxon_match": Check(
        record.taxon_match,
        {"none_penalty": 15, "fuzzy_penalty": 5, "higherrank_penalty": 3},
        "The name is in the taxonomic backbone (exact, fuzzy or at a higher rank).",
    ),
    "basis_of_record": Check(
        record.basis_of_record, {"penalty": 5}, "A Darwin Core basis of record."
    ),
    "individual_count": Check(
        record.individual_count,
        {"penalty": 5, "max_count": 1_000_000},
        "A plausible individual count.",
        {"max_count": (1, 10**12)},
    ),
    "multimedia": Check(record.multimedia, {"penalty": 5}, "Media URLs usable."),
    "media_present": Check(
        record.media_present, {"penalty": 10}, "At least one photo or sound as evidence."
    ),
    "image_quality": Check(
        evidence.image_quality,
        {
            "unreadable_penalty": 15,
            "min_side_px": 400,
            "low_resolution_penalty": 10,
            "min_sharpness": 10.0,
            "blurry_penalty": 15,
            "max_clipped_share": 0.25,
            "exposure_penalty": 5,
        },
        "Photos readable, big enough, sharp and well exposed.",
        {"min_side_px": (0, 100_000), "min_sharpness": (0, 1e9), "max_clipped_share": (0, 1)},
    ),
    "duplicates": Check(
        evidence.duplicates,
        {"other_user_penalty": 40, "same_user_penalty": 10, "max_distance": 6},
        "Photos not reused from other observations (perceptual hash).",
        {"max_distance": (0, 64)},
    ),
    "spatial_outlier": Check(
        plausibility.spatial_outlier,
        {"min_records": 5, "max_km": 500.0, "penalty": 10},
        "Near the taxon's accepted records.",
        {"min_records": (0, 1_000_000), "max_km": (0, location.EARTH_HALF_CIRCUMFERENCE_M / 1000)},
    ),
    "seasonal_outlier": Check(
        plausibility.seasonal_outlier,
        {"min_records": 5, "max_days": 45, "penalty": 5},
        "In the taxon's season among accepted records.",
        {"min_records": (0, 1_000_000), "max_days": (0, 366)},
    ),
    "open_sea": Check(plausibility.open_sea, {"penalty": 30}, "Land plants not in the open sea."),
    "observer": Check(
        plausibility.observer,
        {"min_observations": 10, "min_research_share": 0.2, "penalty": 2},
        "The observer's track record.",
        {"min_observations": (0, 1_000_000), "min_research_share": (0, 1)},
    ),
    "machine_id": Check(
        plausibility.machine_id,
        {"min_score": 0.5, "penalty": 10},
        "Agreement with the machine identification (svc-plantid).",
        {"min_score": (0, 1)},
    ),
    "measurements": Check(
        plausibility.measurements,
        {
            "ranges": {},
            "out_of_range_penalty": 20,
            "stuck_run": 5,
            "stuck_penalty": 10,
            "spike_min_history": 5,
            "spike_z": 8.0,
            "spike_penalty": 10,
        },
        "Sensor values within the unit's physical range, not stuck, no spikes.",
        {"stuck_run": (2, 1000), "spike_min_history": (2, 1000), "spike_z": (0, 1000)},
    ),
}

DEFAULT_RESEARCH_MIN_SCORE = 50.0
MAX_RANGES = 200
"""Units a rule set may give its own physical range for (``measurements.ranges``)."""


def param_error(check: str, name: str, value: Any) -> str | None:
    """Why ``value`` is no valid ``name`` parameter of ``check`` (a known check), or None:
    checks do arithmetic with dates and distances, so a huge, non-finite or mistyped value
    would fail every assessment of the project."""
    default = CHECKS[check].params.get(name)
    if default is None:
        return "is no parameter of this check"
    if isinstance(default, dict):
        return _ranges_error(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "must be a number"
    low, high = CHECKS[check].bounds.get(name, (0, 100))
    whole = isinstance(default, int)
    in_range = math.isfinite(value) and low <= value <= high
    if not (in_range and (isinstance(value, int) or not whole)):
        return f"must be a {'whole ' if whole else ''}number from {low:g} to {high:g}"
    return None


def _ranges_error(value: Any) -> str | None:
    if not isinstance(value, dict) or len(value) > MAX_RANGES:
        return f"must map at most {MAX_RANGES} units to their [lowest, highest] values"
    for unit, bounds in value.items():
        if not (
            isinstance(bounds, list | tuple)
            and len(bounds) == 2
            and all(isinstance(b, int | float) and not isinstance(b, bool) for b in bounds)
            and all(math.isfinite(b) for b in bounds)
            and bounds[0] <= bounds[1]
        ):
            return f"must give the unit {unit!r} two finite numbers, the lowest first"
    return None


_INVALID_DATE = {"RECORDED_DATE_MISSING", "RECORDED_DATE_INVALID", "RECORDED_DATE_UNLIKELY"}


@dataclass(frozen=True)
class CheckSettings:
    enabled: bool = True
    weight: float = 1.0
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RuleSet:
    project: str
    version: int = 0
    checks: Mapping[str, CheckSettings] = field(default_factory=dict)
    research_min_score: float = DEFAULT_RESEARCH_MIN_SCORE

    def settings(self, name: str) -> CheckSettings:
        return self.checks.get(name, CheckSettings())

    def params(self, name: str) -> dict[str, Any]:
        return {**CHECKS[name].params, **self.settings(name).params}

    def enabled(self, name: str) -> bool:
        return self.settings(name).enabled

    @functools.cached_property
    def plan(self) -> tuple[tuple[str, Rule, Mapping[str, Any], float], ...]:
        """The enabled checks with their merged parameters and weights, worked out once per
        rule set rather than once per assessment."""
        return tuple(
            (name, check.rule, self.params(name), self.settings(name).weight)
            for name, check in CHECKS.items()
            if self.enabled(name)
        )


@dataclass(frozen=True)
class Result:
    score: float
    grade: Grade
    flags: list[Flag]
    community: CommunityTaxon | None


def assess(obs: Observation, ctx: Context, ruleset: RuleSet) -> Result:
    flags = [
        _flag(finding, weight, name)
        for name, rule, params, weight in ruleset.plan
        for finding in _run(name, rule, obs, ctx, params, ruleset)
    ]
    score = round(max(0.0, 100.0 - sum(f.effect for f in flags)), 1)
    codes = {f.code for f in flags}
    result = grade(
        obs,
        has_valid_date=bool(obs.event_date) and not codes & _INVALID_DATE,
        has_valid_location=location.valid_point(obs),
        taxon_of=ctx.taxon_of,
        score=score,
        params={"research_min_score": ruleset.research_min_score},
    )
    flags += [_flag(f, 1.0, "grade") for f in result.findings]
    return Result(score, result.grade, flags, result.community)


def _run(
    name: str,
    rule: Rule,
    obs: Observation,
    ctx: Context,
    params: Mapping[str, Any],
    ruleset: RuleSet,
) -> list[Finding]:
    """A check that fails (a bug, or a rule set stored before its parameters were bounded)
    raises no flag: one check must not fail the assessment, nor dead-letter its event."""
    try:
        return rule(obs, ctx, params)
    except Exception:
        log.exception(
            "check %s failed on observation %s (rule set %s v%s): skipped",
            name,
            obs.id,
            ruleset.project,
            ruleset.version,
        )
        return []


def _flag(finding: Finding, weight: float, check: str) -> Flag:
    return Flag(
        code=finding.code,
        severity=finding.severity,
        message=finding.message,
        evidence=finding.evidence,
        effect=round(finding.penalty * weight, 2),
        tip=finding.tip,
        check=check,
    )
