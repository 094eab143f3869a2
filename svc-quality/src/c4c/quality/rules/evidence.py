"""The photos as evidence: readable, big and sharp enough, well exposed, not another
observation's photo, and with EXIF that does not contradict the observation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from c4c.quality.rules.location import valid_point
from c4c.quality.rules.model import Context, Duplicate, Finding, Observation

EARTH_RADIUS_KM = 6371.0088


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def image_quality(obs: Observation, ctx: Context, params: Mapping[str, Any]) -> list[Finding]:
    findings = []
    for facts in ctx.images:
        ref = {"mediaId": facts.media_id}
        if not facts.readable:
            findings.append(
                Finding(
                    "IMAGE_UNREADABLE",
                    "error",
                    "A photo cannot be decoded.",
                    {**ref, "error": facts.error},
                    params["unreadable_penalty"],
                    "Upload the photo again.",
                )
            )
            continue
        if min(facts.width, facts.height) < params["min_side_px"]:
            findings.append(
                Finding(
                    "IMAGE_LOW_RESOLUTION",
                    "warning",
                    f"A photo is only {facts.width}x{facts.height} pixels.",
                    {**ref, "width": facts.width, "height": facts.height},
                    params["low_resolution_penalty"],
                    "Upload the original photo, not a thumbnail.",
                )
            )
        if facts.sharpness < params["min_sharpness"]:
            findings.append(
                Finding(
                    "IMAGE_BLURRY",
                    "warning",
                    "A photo is blurred.",
                    {**ref, "sharpness": round(facts.sharpness, 1)},
                    params["blurry_penalty"],
                    "Hold still and tap the subject to focus before taking the photo.",
                )
            )
        for code, share, message, tip in (
            ("IMAGE_OVEREXPOSED", facts.clipped_highlights, "too bright", "Avoid direct sun."),
            ("IMAGE_UNDEREXPOSED", facts.clipped_shadows, "too dark", "Find more light."),
        ):
            if share > params["max_clipped_share"]:
                findings.append(
                    Finding(
                        code,
                        "warning",
                        f"A photo is {message}: {share:.0%} of it is clipped.",
                        {**ref, "clippedShare": round(share, 3)},
                        params["exposure_penalty"],
                        tip,
                    )
                )
    return findings


def duplicates(obs: Observation, ctx: Context, params: Mapping[str, Any]) -> list[Finding]:
    """One finding per photo and kind (another user's, or the observer's own), naming the
    closest match and how many there are: a photo copied a hundred times is one problem,
    not a hundred, and its flags stay small."""
    closest: dict[tuple[str | None, bool], tuple[Duplicate, int]] = {}
    for dup in ctx.duplicates:
        other_user = dup.other_recorded_by is not None and dup.other_recorded_by != obs.recorded_by
        key = (dup.media_id, other_user)
        best, count = closest.get(key, (dup, 0))
        closest[key] = (dup if dup.distance < best.distance else best, count + dup.matches)
    findings = []
    for (media_id, other_user), (dup, count) in closest.items():
        findings.append(
            Finding(
                "IMAGE_DUPLICATE",
                "error" if other_user else "warning",
                "A photo is the same as one of "
                + ("another user's observations." if other_user else "your other observations."),
                {
                    "mediaId": media_id,
                    "otherObservationId": dup.other_observation_id,
                    "otherMediaId": dup.other_media_id,
                    "hammingDistance": dup.distance,
                    "otherUser": other_user,
                    "matches": count,
                },
                params["other_user_penalty"] if other_user else params["same_user_penalty"],
                "Use your own photos, one set per observation.",
            )
        )
    return findings


def exif_location(obs: Observation, ctx: Context, params: Mapping[str, Any]) -> list[Finding]:
    if not valid_point(obs):
        return []
    assert obs.latitude is not None
    assert obs.longitude is not None
    allowed_km = params["max_km"] + (obs.uncertainty_m or 0) / 1000
    for media in obs.media:
        if media.exif_latitude is None or media.exif_longitude is None:
            continue
        km = haversine_km(obs.latitude, obs.longitude, media.exif_latitude, media.exif_longitude)
        if km > allowed_km:
            return [
                Finding(
                    "EXIF_LOCATION_MISMATCH",
                    "warning",
                    f"A photo's GPS position is {km:.1f} km from the observation's.",
                    {
                        "mediaId": media.id,
                        "distanceKm": round(km, 1),
                        "exifLatitude": media.exif_latitude,
                        "exifLongitude": media.exif_longitude,
                    },
                    params["penalty"],
                    "Check the position on the map: the photo's camera says otherwise.",
                )
            ]
    return []
