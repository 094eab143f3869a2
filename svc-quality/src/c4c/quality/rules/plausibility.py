"""Does it fit what the suite has accepted: where and when the taxon is usually seen, plants
on land, the observer's record, the machine's identification; and sensor values."""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

from c4c.quality.rules.location import valid_point
from c4c.quality.rules.model import Context, Finding, Observation

TERRESTRIAL_PHYLA = frozenset({"Tracheophyta", "Bryophyta", "Marchantiophyta"})
"""Land plants; seagrasses are Tracheophyta too but never in *open* sea."""


def spatial_outlier(obs: Observation, ctx: Context, params: Mapping[str, Any]) -> list[Finding]:
    records = ctx.taxon_records
    if records is None or records.count < params["min_records"] or records.nearest_km is None:
        return []
    if records.nearest_km <= params["max_km"]:
        return []
    return [
        Finding(
            "SPATIAL_OUTLIER",
            "warning",
            f"The nearest accepted record of this taxon is {records.nearest_km:.0f} km away.",
            {"nearestKm": round(records.nearest_km, 1), "acceptedRecords": records.count},
            params["penalty"],
            "Check the identification and the position: this would be a notable record.",
        )
    ]


def seasonal_outlier(obs: Observation, ctx: Context, params: Mapping[str, Any]) -> list[Finding]:
    records = ctx.taxon_records
    if records is None or records.count < params["min_records"] or records.nearest_days is None:
        return []
    if records.nearest_days <= params["max_days"]:
        return []
    return [
        Finding(
            "SEASONAL_OUTLIER",
            "warning",
            f"Accepted records of this taxon are at least {records.nearest_days} days of the "
            "year away from this one.",
            {"nearestDays": records.nearest_days, "acceptedRecords": records.count},
            params["penalty"],
            "Check the date and the identification.",
        )
    ]


def open_sea(obs: Observation, ctx: Context, params: Mapping[str, Any]) -> list[Finding]:
    match = ctx.taxon_match
    if match is None or match.taxon is None or match.taxon.phylum not in TERRESTRIAL_PHYLA:
        return []
    if not valid_point(obs):
        return []
    assert obs.latitude is not None
    assert obs.longitude is not None
    if not ctx.geography.in_open_sea(obs.latitude, obs.longitude):
        return []
    return [
        Finding(
            "TERRESTRIAL_IN_OPEN_SEA",
            "error",
            "A land plant is placed in the open sea.",
            {"phylum": match.taxon.phylum, "decimalLatitude": obs.latitude},
            params["penalty"],
            "Check the position on the map.",
        )
    ]


def observer(obs: Observation, ctx: Context, params: Mapping[str, Any]) -> list[Finding]:
    record = ctx.observer
    if record is None or record.observations < params["min_observations"]:
        return []
    share = record.research / record.observations
    if share >= params["min_research_share"]:
        return []
    return [
        Finding(
            "OBSERVER_LOW_TRACK_RECORD",
            "info",
            f"{share:.0%} of this observer's observations reached research grade.",
            {"observations": record.observations, "research": record.research},
            params["penalty"],
            "Sharp photos of the whole organism help others confirm your observations.",
        )
    ]


def machine_id(obs: Observation, ctx: Context, params: Mapping[str, Any]) -> list[Finding]:
    machine = ctx.machine_id
    if machine is None or not obs.scientific_name:
        return []
    if machine.rejected or machine.scientific_name is None:
        return []
    if (machine.score or 0.0) < params["min_score"]:
        return []
    submitted = ctx.taxon_of(obs.scientific_name)
    proposed = ctx.taxon_of(machine.scientific_name)
    same_genus = (
        submitted is not None and proposed is not None and submitted.genus == proposed.genus
    )
    if same_genus or obs.scientific_name.lower() == machine.scientific_name.lower():
        return []
    return [
        Finding(
            "MACHINE_ID_DISAGREES",
            "warning",
            f"Plant identification suggests {machine.scientific_name}.",
            {
                "scientificName": obs.scientific_name,
                "machineName": machine.scientific_name,
                "machineScore": machine.score,
            },
            params["penalty"],
            f"Compare your photo with {machine.scientific_name}.",
        )
    ]


# --- sensor measurements --------------------------------------------------------------------

PHYSICAL_RANGES: dict[str, tuple[float, float]] = {
    "°c": (-90.0, 100.0),
    "c": (-90.0, 100.0),
    "celsius": (-90.0, 100.0),
    "k": (183.0, 373.0),
    "%": (0.0, 100.0),
    "percent": (0.0, 100.0),
    "ph": (0.0, 14.0),
    "µg/m3": (0.0, 2000.0),
    "µg/m³": (0.0, 2000.0),
    "ug/m3": (0.0, 2000.0),
    "db": (0.0, 194.0),
    "dba": (0.0, 194.0),
    "hpa": (870.0, 1085.0),
    "m/s": (0.0, 113.0),
    "km/h": (0.0, 408.0),
    "ppm": (0.0, 1_000_000.0),
    "lux": (0.0, 150_000.0),
    "ntu": (0.0, 4000.0),
    "mg/l": (0.0, 1_000_000.0),
    "µs/cm": (0.0, 200_000.0),
    "m": (0.0, 8849.0),
    "mm": (0.0, 2000.0),
}
"""Physically possible values per unit (an observatory may narrow them in its rule set)."""


def measurement_key(type_: str, unit: str | None) -> str:
    return f"{type_.strip().lower()}|{(unit or '').strip().lower()}"


def measurements(obs: Observation, ctx: Context, params: Mapping[str, Any]) -> list[Finding]:
    if not obs.measurements:
        return []
    findings = []
    ranges = {**PHYSICAL_RANGES, **{k.lower(): tuple(v) for k, v in params["ranges"].items()}}
    for m in obs.measurements:
        if not isinstance(m.value, int | float) or isinstance(m.value, bool):
            continue
        value = float(m.value)
        evidence = {"measurementType": m.type, "measurementUnit": m.unit, "value": value}
        bounds = ranges.get((m.unit or "").strip().lower())
        if bounds is not None and not bounds[0] <= value <= bounds[1]:
            findings.append(
                Finding(
                    "MEASUREMENT_OUT_OF_RANGE",
                    "error",
                    f"{m.type} = {value} {m.unit} is physically impossible.",
                    {**evidence, "range": list(bounds)},
                    params["out_of_range_penalty"],
                    "Check the unit and the sensor.",
                )
            )
            continue
        history = ctx.recent_measurements.get(measurement_key(m.type, m.unit), ())
        findings += _series_findings(value, history, evidence, params)
    return findings


def _series_findings(
    value: float, history: tuple[float, ...], evidence: dict[str, Any], params: Mapping[str, Any]
) -> list[Finding]:
    stuck_run = params["stuck_run"]
    if len(history) >= stuck_run - 1 and all(v == value for v in history[-(stuck_run - 1) :]):
        return [
            Finding(
                "MEASUREMENT_STUCK",
                "warning",
                f"The sensor reported {value} {stuck_run} times in a row.",
                {**evidence, "run": stuck_run},
                params["stuck_penalty"],
                "Check that the sensor is connected and working.",
            )
        ]
    if len(history) < params["spike_min_history"]:
        return []
    median = statistics.median(history)
    mad = statistics.median(abs(v - median) for v in history) or 1e-9
    robust_z = abs(value - median) / (1.4826 * mad)
    if robust_z <= params["spike_z"]:
        return []
    return [
        Finding(
            "MEASUREMENT_SPIKE",
            "warning",
            f"{value} is far from this sensor's recent values (median {median:g}).",
            {**evidence, "median": median, "robustZ": round(min(robust_z, 1e6), 1)},
            params["spike_penalty"],
            "Measure again to confirm.",
        )
    ]
