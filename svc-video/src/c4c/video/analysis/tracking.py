"""Multi-object tracking of foreground blobs: boxes in, tracks with ids, ages and lost-frame
counts out. Plain Python: no OpenCV, no I/O, so it is tested with hand-made boxes.

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

    def shifted(self, dx: float, dy: float) -> Box:
        return Box(self.x + dx, self.y + dy, self.w, self.h)

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

    def __post_init__(self) -> None:
        observations, self.observations = self.observations, []
        for observation in observations:
            self.add(observation)

    def add(self, observation: Observation) -> None:
        if self.observations:
            self.travel = max(self.travel, self.first.box.distance(observation.box))
        self.observations.append(observation)
        self._diagonals += observation.box.diagonal

    def restart(self) -> None:
        """Forget all but the last observation: the track goes on as a new event."""
        last = self.observations[-1]
        self.observations, self.travel, self._diagonals = [last], 0.0, last.box.diagonal

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

    def predicted(self, frame: int) -> Box:
        """The last box moved on by the last velocity to ``frame``."""
        if len(self.observations) < 2:
            return self.last.box
        a, b = self.observations[-2], self.observations[-1]
        steps = b.frame - a.frame
        if steps <= 0:
            return b.box
        (ax, ay), (bx, by) = a.box.centre, b.box.centre
        ahead = (frame - b.frame) / steps
        return b.box.shifted((bx - ax) * ahead, (by - ay) * ahead)


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
        predicted = [track.predicted(frame) for track in self.tracks]
        unmatched_tracks = set(range(len(self.tracks)))
        unmatched_boxes = set(range(len(boxes)))
        matches: list[tuple[int, int]] = []

        by_iou = sorted(
            (
                (p.iou(box), ti, bi)
                for ti, p in enumerate(predicted)
                for bi, box in enumerate(boxes)
            ),
            reverse=True,
        )
        for score, ti, bi in by_iou:
            if score < self.params.iou_threshold:
                break
            if ti in unmatched_tracks and bi in unmatched_boxes:
                matches.append((ti, bi))
                unmatched_tracks.discard(ti)
                unmatched_boxes.discard(bi)

        by_distance = sorted(
            (predicted[ti].distance(boxes[bi]) / max(predicted[ti].diagonal, 1.0), ti, bi)
            for ti in unmatched_tracks
            for bi in unmatched_boxes
        )
        for relative, ti, bi in by_distance:
            if relative > self.params.max_distance:
                break
            if ti in unmatched_tracks and bi in unmatched_boxes:
                matches.append((ti, bi))
                unmatched_tracks.discard(ti)
                unmatched_boxes.discard(bi)

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

    def flush(self) -> list[Track]:
        """End every track (the source ended)."""
        ended, self.tracks = self.tracks, []
        return ended
