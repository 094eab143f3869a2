"""Line and zone counters of a stream: how many tracks crossed a line (each way) and how
many entered a zone. Coordinates are fractions of the frame (0..1), so a counter survives a
change of resolution. Plain Python, fed with track centres by the pipeline."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

Point = tuple[float, float]


def _side(a: Point, b: Point, p: Point) -> float:
    """> 0 when ``p`` is left of the directed line a→b, < 0 when right."""
    return (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0])


def _segments_cross(p1: Point, p2: Point, a: Point, b: Point) -> bool:
    d1, d2 = _side(a, b, p1), _side(a, b, p2)
    d3, d4 = _side(p1, p2, a), _side(p1, p2, b)
    return d1 * d2 < 0 and d3 * d4 < 0


def inside(polygon: Sequence[Point], p: Point) -> bool:
    """Ray casting: is ``p`` inside ``polygon``?"""
    x, y = p
    result = False
    n = len(polygon)
    for i in range(n):
        (x1, y1), (x2, y2) = polygon[i], polygon[(i + 1) % n]
        if (y1 > y) != (y2 > y) and x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
            result = not result
    return result


@dataclass
class LineCounter:
    """Counts crossings of the segment a→b: ``forward`` when a track moves from its left to
    its right side (image coordinates: y down), ``backward`` the other way. A track counts
    at most once per direction."""

    name: str
    a: Point
    b: Point
    forward: int = 0
    backward: int = 0
    _counted: set[tuple[int, bool]] = field(default_factory=set, repr=False)

    def observe(self, track_id: int, previous: Point, current: Point) -> None:
        if not _segments_cross(previous, current, self.a, self.b):
            return
        is_forward = _side(self.a, self.b, previous) > 0
        if (track_id, is_forward) in self._counted:
            return
        self._counted.add((track_id, is_forward))
        if is_forward:
            self.forward += 1
        else:
            self.backward += 1

    def summary(self) -> dict[str, int]:
        return {"forward": self.forward, "backward": self.backward}


@dataclass
class ZoneCounter:
    """Counts the tracks that entered a polygon (each once) and how many are in it now."""

    name: str
    polygon: list[Point]
    entered: int = 0
    _inside_now: set[int] = field(default_factory=set, repr=False)
    _seen: set[int] = field(default_factory=set, repr=False)

    def observe(self, track_id: int, current: Point) -> None:
        if inside(self.polygon, current):
            self._inside_now.add(track_id)
            if track_id not in self._seen:
                self._seen.add(track_id)
                self.entered += 1
        else:
            self._inside_now.discard(track_id)

    def forget(self, track_id: int) -> None:
        self._inside_now.discard(track_id)

    def summary(self) -> dict[str, int]:
        return {"entered": self.entered, "occupancy": len(self._inside_now)}


@dataclass
class Counters:
    """Every counter of one source, fed with each track's centre as a frame fraction."""

    lines: list[LineCounter] = field(default_factory=list)
    zones: list[ZoneCounter] = field(default_factory=list)
    _last: dict[int, Point] = field(default_factory=dict, repr=False)

    def observe(self, track_id: int, centre: Point) -> None:
        previous = self._last.get(track_id)
        if previous is not None:
            for line in self.lines:
                line.observe(track_id, previous, centre)
        for zone in self.zones:
            zone.observe(track_id, centre)
        self._last[track_id] = centre

    def forget(self, track_id: int) -> None:
        self._last.pop(track_id, None)
        for zone in self.zones:
            zone.forget(track_id)

    def summary(self) -> dict[str, dict[str, dict[str, int]]]:
        return {
            "lines": {line.name: line.summary() for line in self.lines},
            "zones": {zone.name: zone.summary() for zone in self.zones},
        }
