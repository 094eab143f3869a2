"""What the suite already knows around the observations being assessed — machine
identifications, observers' track records, the accepted records of each taxon, sensors'
recent values — fetched in bulk for a whole batch (one query per kind, not per observation),
and the per-process caches that spare most of those queries.

The caches trade a few seconds of staleness for speed: entries live ``ttl_s`` and this
process forgets an entry as soon as it writes what the entry summarises; another replica's
writes show within the TTL (the statistics they feed tolerate that)."""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from c4c.quality.rules import RuleSet
from c4c.quality.rules.evidence import EARTH_RADIUS_KM
from c4c.quality.rules.model import MachineId, ObserverRecord, TaxonRecords
from c4c.quality.rules.plausibility import measurement_key

K = TypeVar("K")
V = TypeVar("V")
R = TypeVar("R")

ACCEPTED_RECORDS_LIMIT = 2000
"""Most recent accepted records of a taxon the outlier checks compare with."""
MEASUREMENT_HISTORY = 20
"""An observer's last measurement lists the sensor checks look at."""
CACHE_ENTRIES = 50_000


class TtlCache(Generic[K, V]):
    """Values kept ``ttl_s`` seconds; past ``max_entries`` the oldest half is dropped."""

    def __init__(self, ttl_s: float, max_entries: int = CACHE_ENTRIES) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[K, tuple[float, V]] = {}

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None or time.monotonic() - entry[0] > self.ttl_s:
            return None
        return entry[1]

    def put(self, key: K, value: V) -> None:
        if len(self._entries) >= self.max_entries:
            # Insertion order is age order: keep the younger half.
            for old in list(self._entries)[: self.max_entries // 2]:
                del self._entries[old]
        self._entries.pop(key, None)
        self._entries[key] = (time.monotonic(), value)

    def forget(self, key: K) -> None:
        self._entries.pop(key, None)


@dataclass(frozen=True)
class TaxonPoints:
    """A taxon's accepted records as arrays, so the nearest one in space and in the year
    is found vectorised (thousands of records cost microseconds)."""

    position: dict[str, int]
    """Observation id → index, to leave the assessed observation itself out."""
    latitudes: np.ndarray[Any, np.dtype[np.float64]]
    """Radians, as the haversine wants them."""
    longitudes: np.ndarray[Any, np.dtype[np.float64]]
    days: np.ndarray[Any, np.dtype[np.float64]]
    """Day of the year; NaN when the record's date is not a single day."""

    @classmethod
    def of(cls, rows: Sequence[tuple[str, float, float, int | None]]) -> TaxonPoints:
        return cls(
            {row[0]: i for i, row in enumerate(rows)},
            np.radians(np.array([row[1] for row in rows], dtype=np.float64)),
            np.radians(np.array([row[2] for row in rows], dtype=np.float64)),
            np.array([np.nan if row[3] is None else row[3] for row in rows], dtype=np.float64),
        )

    def records_for(
        self,
        observation_id: str | None,
        latitude: float | None,
        longitude: float | None,
        day: int | None,
    ) -> TaxonRecords:
        latitudes, longitudes, days = self.latitudes, self.longitudes, self.days
        own = self.position.get(observation_id or "")
        if own is not None:
            keep = np.arange(len(self.position)) != own
            latitudes, longitudes, days = latitudes[keep], longitudes[keep], days[keep]
        if not latitudes.size:
            return TaxonRecords(0, None, None)
        nearest_km = nearest_days = None
        if latitude is not None and longitude is not None and math.isfinite(latitude + longitude):
            nearest_km = float(self._distances_km(latitudes, longitudes, latitude, longitude).min())
        dated = days[~np.isnan(days)]
        if day is not None and dated.size:
            apart = np.abs(dated - day) % 366
            nearest_days = int(np.minimum(apart, 366 - apart).min())
        return TaxonRecords(int(latitudes.size), nearest_km, nearest_days)

    @staticmethod
    def _distances_km(
        latitudes: np.ndarray[Any, Any],
        longitudes: np.ndarray[Any, Any],
        latitude: float,
        longitude: float,
    ) -> np.ndarray[Any, Any]:
        lat, lon = math.radians(latitude), math.radians(longitude)
        a = (
            np.sin((latitudes - lat) / 2) ** 2
            + math.cos(lat) * np.cos(latitudes) * np.sin((longitudes - lon) / 2) ** 2
        )
        distances: np.ndarray[Any, Any] = (
            2 * EARTH_RADIUS_KM * np.arcsin(np.minimum(1.0, np.sqrt(a)))
        )
        return distances


async def cached_or_loaded(
    cache: TtlCache[str, V],
    keys: set[str],
    load: Callable[[list[str]], Awaitable[Mapping[str, R]]],
    make: Callable[[R], V],
) -> dict[str, V]:
    """``keys``' values from ``cache``; the missing ones loaded in one call, then cached."""
    found = {key: value for key in keys if (value := cache.get(key)) is not None}
    missing = sorted(keys - found.keys())
    if missing:
        for key, raw in (await load(missing)).items():
            found[key] = make(raw)
            cache.put(key, found[key])
    return found


class ContextCache:
    """The per-process caches of rule sets, observers' counts and taxa's accepted records."""

    def __init__(self, ttl_s: float) -> None:
        self.rulesets: TtlCache[str, RuleSet] = TtlCache(ttl_s)
        self.observers: TtlCache[str, tuple[int, int]] = TtlCache(ttl_s)
        self.taxa: TtlCache[str, TaxonPoints] = TtlCache(ttl_s)

    def changed(self, observers: Iterable[str | None], taxa: Iterable[str | None]) -> None:
        """This process wrote observations of these observers and taxa."""
        for observer in observers:
            if observer is not None:
                self.observers.forget(observer)
        for taxon in taxa:
            if taxon is not None:
                self.taxa.forget(taxon)


@dataclass(frozen=True)
class Counted:
    """How an observation already seen here counts in its observer's record."""

    recorded_by: str | None
    grade: str | None


@dataclass
class Background:
    """The suite's knowledge around one batch, read in bulk."""

    counted: dict[str, Counted] = field(default_factory=dict)
    machine_ids: dict[str, MachineId] = field(default_factory=dict)
    observers: dict[str, tuple[int, int]] = field(default_factory=dict)
    taxa: dict[str, TaxonPoints] = field(default_factory=dict)
    measurements: dict[str, list[tuple[str, list[Any]]]] = field(default_factory=dict)
    """Observer → their last measurement lists (observation id, list), oldest first."""

    def observer(self, observation_id: str | None, recorded_by: str) -> ObserverRecord:
        """The observer's record without the assessed observation itself."""
        total, research = self.observers.get(recorded_by, (0, 0))
        own = self.counted.get(observation_id or "")
        if own is not None and own.recorded_by == recorded_by:
            total -= 1
            research -= own.grade == "research"
        return ObserverRecord(max(total, 0), max(research, 0))

    def recent_measurements(
        self, observation_id: str | None, recorded_by: str
    ) -> dict[str, tuple[float, ...]]:
        series: dict[str, list[float]] = {}
        lists = [m for oid, m in self.measurements.get(recorded_by, []) if oid != observation_id]
        for items in lists[-MEASUREMENT_HISTORY:]:
            for m in items:
                value = m.get("measurementValue")
                if isinstance(value, int | float) and not isinstance(value, bool):
                    key = measurement_key(str(m.get("measurementType")), m.get("measurementUnit"))
                    series.setdefault(key, []).append(float(value))
        return {k: tuple(v) for k, v in series.items()}
