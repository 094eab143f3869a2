"""Multi-object tracking of foreground blobs: boxes in, tracks with ids, ages and lost-frame
counts out. No OpenCV, no I/O, so it is tested with hand-made boxes.

Matching is greedy, best first: pairs of (track, box) by IoU with the track's predicted box
(its last box moved by its last velocity, which keeps fast or sparsely sampled objects
matched), then the leftovers by centroid distance relative to the object's size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Box:
    """An axis-aligned box in source-frame pixels."""

    x: float
    y: float
    w: float
    h: float

    @property
    def area(self) -> float:
        return self.w * self.h

    @property
    def centre(self) -> tuple[float, float]:
        return self.x + self.w / 2, self.y + self.h / 2

    @property
    def diagonal(self) -> float:
        return math.hypot(self.w, self.h)

    def iou(self, other: Box) -> float:
        ix = max(0.0, min(self.x + self.w, other.x + other.w) - max(self.x, other.x))
        iy = max(0.0, min(self.y + self.h, other.y + other.h) - max(self.y, other.y))
        inter = ix * iy
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0

    def distance(self, other: Box) -> float:
        (ax, ay), (bx, by) = self.centre, other.centre
        return math.hypot(ax - bx, ay - by)


@dataclass(frozen=True, slots=True)
class Observation:
    """Where a track was seen: the frame's index, its time in seconds, the box."""

    frame: int
    t: float
    box: Box


@dataclass(slots=True)
class Track:
    id: int
    observations: list[Observation] = field(default_factory=list)
    lost: int = 0  # analysed frames since the last match
    travel: float = 0.0  # farthest the centre got from where it was first seen
    _diagonals: float = 0.0
    # Centres of the first box and of the last two, kept by ``add``: travel and the
    # predicted box need them at every frame (recomputing them was a third of the tracker).
    _origin: tuple[float, float] = field(default=(0.0, 0.0), repr=False, compare=False)
    _previous_centre: tuple[float, float] = field(default=(0.0, 0.0), repr=False, compare=False)
    _last_centre: tuple[float, float] = field(default=(0.0, 0.0), repr=False, compare=False)

    def __post_init__(self) -> None:
        observations, self.observations = self.observations, []
        for observation in observations:
            self.add(observation)

    def add(self, observation: Observation) -> None:
        box = observation.box
        centre = box.centre
        if self.observations:
            (ox, oy), (cx, cy) = self._origin, centre
            self.travel = max(self.travel, math.hypot(ox - cx, oy - cy))
        else:
            self._origin = centre
        self.observations.append(observation)
        self._previous_centre, self._last_centre = self._last_centre, centre
        self._diagonals += box.diagonal

    def restart(self) -> None:
        """Forget all but the last observation: the track goes on as a new event."""
        last = self.observations[-1]
        self.observations, self.travel, self._diagonals = [last], 0.0, last.box.diagonal
        self._origin = self._last_centre

    @property
    def first(self) -> Observation:
        return self.observations[0]

    @property
    def last(self) -> Observation:
        return self.observations[-1]

    @property
    def hits(self) -> int:
        return len(self.observations)

    @property
    def duration(self) -> float:
        return self.last.t - self.first.t

    @property
    def mean_diagonal(self) -> float:
        return self._diagonals / len(self.observations)

    def predicted(self, frame: int) -> tuple[float, float, float, float]:
        """The last box moved on by the last velocity to ``frame``, as (x0, y0, x1, y1)."""
        observations = self.observations
        b = observations[-1]
        box = b.box
        if len(observations) < 2:
            return _corners(box)
        steps = b.frame - observations[-2].frame
        if steps <= 0:
            return _corners(box)
        (ax, ay), (bx, by) = self._previous_centre, self._last_centre
        ahead = (frame - b.frame) / steps
        x0, y0 = box.x + (bx - ax) * ahead, box.y + (by - ay) * ahead
        return x0, y0, x0 + box.w, y0 + box.h


@dataclass(frozen=True, slots=True)
class TrackerParams:
    iou_threshold: float = 0.1
    max_distance: float = 1.0  # centroid distance, in object diagonals
    max_lost: int = 5  # analysed frames a track may go unseen before it ends


@dataclass(slots=True)
class TrackerUpdate:
    active: list[Track]  # matched or newly born this frame
    ended: list[Track]  # lost for longer than ``max_lost``


class Tracker:
    def __init__(self, params: TrackerParams | None = None) -> None:
        self.params = params or TrackerParams()
        self.tracks: list[Track] = []
        self._next_id = 1

    def update(self, frame: int, t: float, boxes: list[Box]) -> TrackerUpdate:
        matches = self._match(frame, boxes) if self.tracks and boxes else []
        unmatched_tracks = set(range(len(self.tracks))) - {ti for ti, _ in matches}
        unmatched_boxes = set(range(len(boxes))) - {bi for _, bi in matches}

        active: list[Track] = []
        for ti, bi in matches:
            track = self.tracks[ti]
            track.add(Observation(frame, t, boxes[bi]))
            track.lost = 0
            active.append(track)
        ended: list[Track] = []
        survivors: list[Track] = [self.tracks[ti] for ti, _ in matches]
        for ti in sorted(unmatched_tracks):
            track = self.tracks[ti]
            track.lost += 1
            (ended if track.lost > self.params.max_lost else survivors).append(track)
        for bi in sorted(unmatched_boxes):
            track = Track(self._next_id, [Observation(frame, t, boxes[bi])])
            self._next_id += 1
            survivors.append(track)
            active.append(track)
        self.tracks = sorted(survivors, key=lambda tr: tr.id)
        return TrackerUpdate(active, ended)

    def _match(self, frame: int, boxes: list[Box]) -> list[tuple[int, int]]:
        """(track, box) index pairs: by IoU with the predicted boxes, best first, then the
        leftovers by relative centroid distance, nearest first. Plain Python: a frame has a
        handful to a few dozen of each, and most pairs do not overlap at all, which two
        comparisons tell; numpy's per-call cost on such small arrays was twice this."""
        params = self.params
        predicted = [track.predicted(frame) for track in self.tracks]
        found = [_corners(box) for box in boxes]
        threshold = params.iou_threshold
        scored: list[tuple[float, int, int]] = []
        for ti, (ax0, ay0, ax1, ay1) in enumerate(predicted):
            area = (ax1 - ax0) * (ay1 - ay0)
            for bi, (bx0, by0, bx1, by1) in enumerate(found):
                if bx0 >= ax1 or bx1 <= ax0 or by0 >= ay1 or by1 <= ay0:  # disjoint: IoU 0
                    if threshold <= 0:
                        scored.append((0.0, ti, bi))
                    continue
                inter = (min(ax1, bx1) - max(ax0, bx0)) * (min(ay1, by1) - max(ay0, by0))
                union = area + (bx1 - bx0) * (by1 - by0) - inter
                iou = inter / union if union > 0 else 0.0
                if iou >= threshold:
                    scored.append((iou, ti, bi))
        taken_tracks: set[int] = set()
        taken_boxes: set[int] = set()
        matches: list[tuple[int, int]] = []

        def take(candidates: list[tuple[float, int, int]]) -> None:
            for _, ti, bi in candidates:
                if ti not in taken_tracks and bi not in taken_boxes:
                    matches.append((ti, bi))
                    taken_tracks.add(ti)
                    taken_boxes.add(bi)

        # Highest IoU first; ties to the higher track, then box index.
        take(sorted(scored, reverse=True))
        if len(taken_tracks) == len(predicted) or len(taken_boxes) == len(found):
            return matches  # the usual frame: nothing left over to match by distance

        # Centroid distance in units of the predicted box's diagonal.
        centres = [((x0 + x1) / 2, (y0 + y1) / 2) for x0, y0, x1, y1 in found]
        near: list[tuple[float, int, int]] = []
        for ti, (ax0, ay0, ax1, ay1) in enumerate(predicted):
            if ti in taken_tracks:
                continue
            cx, cy = (ax0 + ax1) / 2, (ay0 + ay1) / 2
            diagonal = max(math.hypot(ax1 - ax0, ay1 - ay0), 1.0)
            for bi, (bx, by) in enumerate(centres):
                if bi not in taken_boxes:
                    relative = math.hypot(cx - bx, cy - by) / diagonal
                    if relative <= params.max_distance:
                        near.append((relative, ti, bi))
        take(sorted(near))
        return matches

    def flush(self) -> list[Track]:
        """End every track (the source ended)."""
        ended, self.tracks = self.tracks, []
        return ended


def _corners(box: Box) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1)."""
    return box.x, box.y, box.x + box.w, box.y + box.h
