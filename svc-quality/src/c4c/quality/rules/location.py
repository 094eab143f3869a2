"""Where: GBIF-style interpretation of the coordinates against their range, the stated
country (offline) and their precision."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from c4c.quality.rules.model import Context, Finding, Observation

EARTH_HALF_CIRCUMFERENCE_M = 20_037_509


def valid_point(obs: Observation) -> bool:
    lat, lon = obs.latitude, obs.longitude
    return (
        lat is not None
        and lon is not None
        and math.isfinite(lat)
        and math.isfinite(lon)
        and -90 <= lat <= 90
        and -180 <= lon <= 180
        and not (lat == 0 and lon == 0)
    )


def coordinates(obs: Observation, ctx: Context, params: Mapping[str, Any]) -> list[Finding]:
    lat, lon = obs.latitude, obs.longitude
    if lat is None or lon is None:
        return [
            Finding(
                "COORDINATE_MISSING",
                "error",
                "The observation has no coordinates.",
                {"decimalLatitude": lat, "decimalLongitude": lon},
                params["missing_penalty"],
                "Turn on location in your app or place the observation on the map.",
            )
        ]
    evidence = {"decimalLatitude": lat, "decimalLongitude": lon}
    if not (math.isfinite(lat) and math.isfinite(lon)) or abs(lat) > 90 or abs(lon) > 180:
        findings = [
            Finding(
                "COORDINATE_OUT_OF_RANGE",
                "error",
                "Latitude must lie within ±90° and longitude within ±180°.",
                evidence,
                params["out_of_range_penalty"],
                "Check the coordinates: they cannot be on Earth.",
            )
        ]
        if abs(lat) > 90 and abs(lon) <= 90:
            findings.append(_swapped(evidence, params))
        return findings
    if lat == 0 and lon == 0:
        return [
            Finding(
                "ZERO_COORDINATE",
                "error",
                "Both coordinates are 0, a placeholder rather than a place.",
                evidence,
                params["zero_penalty"],
                "Place the observation where it was made.",
            )
        ]
    return []


def _swapped(evidence: Mapping[str, Any], params: Mapping[str, Any]) -> Finding:
    return Finding(
        "PRESUMED_SWAPPED_COORDINATE",
        "error",
        "Latitude and longitude look swapped.",
        {**evidence, "suggested": [evidence["decimalLongitude"], evidence["decimalLatitude"]]},
        params["swapped_penalty"],
        "Latitude is north-south (-90…90), longitude east-west (-180…180).",
    )


def country(obs: Observation, ctx: Context, params: Mapping[str, Any]) -> list[Finding]:
    """The point against the stated country: negated or swapped coordinates that would
    land in it are named as such; anything else is a mismatch."""
    stated = (obs.country_code or "").upper()
    if not stated or not valid_point(obs):
        return []
    lat, lon = obs.latitude, obs.longitude
    assert lat is not None
    assert lon is not None
    found = ctx.geography.country_at(lat, lon)
    if found is None or found == stated:
        return []
    evidence = {"decimalLatitude": lat, "decimalLongitude": lon, "countryCode": stated}
    alternatives = [
        ("PRESUMED_NEGATED_LATITUDE", -lat, lon, "The latitude's sign looks wrong."),
        ("PRESUMED_NEGATED_LONGITUDE", lat, -lon, "The longitude's sign looks wrong."),
        ("PRESUMED_SWAPPED_COORDINATE", lon, lat, "Latitude and longitude look swapped."),
    ]
    for code, alt_lat, alt_lon, message in alternatives:
        if abs(alt_lat) <= 90 and ctx.geography.country_at(alt_lat, alt_lon) == stated:
            return [
                Finding(
                    code,
                    "error",
                    f"{message} The point is in {found}, not {stated}.",
                    {**evidence, "foundCountry": found, "suggested": [alt_lat, alt_lon]},
                    params["presumed_penalty"],
                    "Check the signs (south and west are negative) and the order of the "
                    "coordinates.",
                )
            ]
    return [
        Finding(
            "COUNTRY_COORDINATE_MISMATCH",
            "warning",
            f"The point is in {found}, not in the stated country {stated}.",
            {**evidence, "foundCountry": found},
            params["mismatch_penalty"],
            "Check the country or the position on the map.",
        )
    ]


def _decimals(value: float) -> int:
    text = repr(float(value))
    if "e" in text or "." not in text:
        return 0
    return len(text.split(".")[1].rstrip("0"))


def precision(obs: Observation, ctx: Context, params: Mapping[str, Any]) -> list[Finding]:
    findings = []
    if valid_point(obs):
        assert obs.latitude is not None
        assert obs.longitude is not None
        decimals = max(_decimals(obs.latitude), _decimals(obs.longitude))
        if decimals < params["min_decimals"] and obs.uncertainty_m is None:
            findings.append(
                Finding(
                    "COORDINATE_ROUNDED",
                    "info",
                    f"The coordinates have {decimals} decimal places: they place the "
                    "observation only roughly.",
                    {"decimals": decimals},
                    params["rounded_penalty"],
                    "Use the GPS position, or say how precise it is "
                    "(coordinateUncertaintyInMeters).",
                )
            )
    uncertainty = obs.uncertainty_m
    if uncertainty is not None and not (
        math.isfinite(uncertainty) and 0 < uncertainty <= EARTH_HALF_CIRCUMFERENCE_M
    ):
        findings.append(
            Finding(
                "COORDINATE_UNCERTAINTY_METERS_INVALID",
                "warning",
                "The coordinate uncertainty must be more than 0 and at most half the "
                "Earth's circumference.",
                {"coordinateUncertaintyInMeters": uncertainty},
                params["uncertainty_invalid_penalty"],
                None,
            )
        )
    elif uncertainty is not None and uncertainty > params["max_uncertainty_m"]:
        findings.append(
            Finding(
                "COORDINATE_UNCERTAINTY_LARGE",
                "warning",
                f"The position is only known within {uncertainty:.0f} m.",
                {"coordinateUncertaintyInMeters": uncertainty},
                params["uncertainty_large_penalty"],
                "Wait for a GPS fix before saving the observation.",
            )
        )
    return findings
