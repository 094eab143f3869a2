"""When: the event date as Darwin Core allows it (an instant, a day, a month, a year or an
interval), checked for being a real date, likely, and agreeing with the photos' EXIF."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from c4c.quality.rules.model import Context, Finding, Observation

_PARTIAL = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?$")


def _single(text: str) -> tuple[datetime, datetime]:
    match = _PARTIAL.match(text)
    if match:
        year, month, day = (int(g) if g else None for g in match.groups())
        assert year is not None
        if day is not None and month is not None:
            start = datetime(year, month, day, tzinfo=UTC)
            return start, start + timedelta(days=1)
        if month is not None:
            start = datetime(year, month, 1, tzinfo=UTC)
            return start, datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
        return datetime(year, 1, 1, tzinfo=UTC), datetime(year + 1, 1, 1, tzinfo=UTC)
    if "T" not in text:
        raise ValueError("not an ISO 8601 date")
    instant = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if instant.tzinfo is None:
        instant = instant.replace(tzinfo=UTC)  # local time of unknown zone: good to a day
    instant = instant.astimezone(UTC)
    return instant, instant + timedelta(microseconds=1)


@functools.lru_cache(maxsize=8192)
def event_period(text: str) -> tuple[datetime, datetime]:
    """``[start, end)`` in UTC of an event date; ValueError when it is no real date (cached:
    several checks and the service parse the same date)."""
    first, slash, second = text.strip().partition("/")
    start, end = _single(first)
    if slash:
        _, end = _single(second)
        if end <= start:
            raise ValueError("the interval ends before it starts")
    return start, end


def recorded_date(obs: Observation, ctx: Context, params: Mapping[str, Any]) -> list[Finding]:
    if not obs.event_date:
        return [
            Finding(
                "RECORDED_DATE_MISSING",
                "error",
                "The observation has no date.",
                {},
                params["missing_penalty"],
                "Say when you made the observation.",
            )
        ]
    evidence = {"eventDate": obs.event_date}
    try:
        start, end = event_period(obs.event_date)
    except (ValueError, OverflowError) as exc:
        return [
            Finding(
                "RECORDED_DATE_INVALID",
                "error",
                f"The date is not a real date: {exc}.",
                evidence,
                params["invalid_penalty"],
                "Use YYYY-MM-DD (and a time with its UTC offset if you know it).",
            )
        ]
    findings = []
    if start > ctx.now + timedelta(hours=params["future_tolerance_hours"]):
        findings.append(
            Finding(
                "RECORDED_DATE_UNLIKELY",
                "error",
                "The date is in the future.",
                {**evidence, "now": ctx.now.isoformat()},
                params["unlikely_penalty"],
                "Check your device's date.",
            )
        )
    elif start.year < params["earliest_year"]:
        findings.append(
            Finding(
                "RECORDED_DATE_UNLIKELY",
                "error",
                f"The date is before {params['earliest_year']}.",
                evidence,
                params["unlikely_penalty"],
                "Check the year.",
            )
        )
    if end - start > timedelta(days=params["max_period_days"]):
        findings.append(
            Finding(
                "RECORDED_DATE_IMPRECISE",
                "info",
                f"The date covers {(end - start).days} days.",
                evidence,
                params["imprecise_penalty"],
                "Give the day of the observation.",
            )
        )
    return findings


def exif_date(obs: Observation, ctx: Context, params: Mapping[str, Any]) -> list[Finding]:
    """A photo's capture time far from the stated date (photos taken later are common for
    specimens, so a margin is allowed)."""
    if not obs.event_date:
        return []
    try:
        start, end = event_period(obs.event_date)
    except (ValueError, OverflowError):
        return []
    margin = timedelta(days=params["max_days"])
    for media in obs.media:
        if not media.exif_taken_at:
            continue
        try:
            taken, _ = _single(media.exif_taken_at)
        except ValueError:
            continue
        if taken < start - margin or taken > end + margin:
            days = min(abs((taken - start).days), abs((taken - end).days))
            return [
                Finding(
                    "RECORDED_DATE_MISMATCH",
                    "warning",
                    f"A photo was taken {days} days away from the stated date.",
                    {"eventDate": obs.event_date, "exifDate": media.exif_taken_at},
                    params["penalty"],
                    "Check the observation's date: the photo's camera says otherwise.",
                )
            ]
    return []
