"""From tracks to events: an event is a track that lived long enough and moved; each keeps
its best keyframe (sharp and large). Plain Python: the keyframe image is an opaque value
the pipeline hands in, so this is tested without any pixels."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

from c4c.video.analysis.tracking import Box, Observation, Track

Image = TypeVar("Image")


@dataclass(frozen=True, slots=True)
class EventParams:
    min_seconds: float = 1.0  # a track shorter than this is noise
    min_hits: int = 4  # analysed frames it was seen in
    min_travel: float = 0.25  # how far its centre moved, in box diagonals
    max_seconds: float = 60.0  # a longer track is cut into several events (live streams)


@dataclass(slots=True)
class Keyframe(Generic[Image]):
    score: float
    observation: Observation
    image: Image


@dataclass(slots=True)
class Event(Generic[Image]):
    track_id: int
    observations: list[Observation]
    keyframe: Keyframe[Image]

    @property
    def start(self) -> Observation:
        return self.observations[0]

    @property
    def end(self) -> Observation:
        return self.observations[-1]


def keyframe_score(box: Box, sharpness: float, frame_size: tuple[int, int]) -> float:
    """Large and sharp wins; a box cut by the frame's edge shows only part of the subject."""
    width, height = frame_size
    touches_edge = box.x <= 1 or box.y <= 1 or box.x + box.w >= width - 1
    touches_edge = touches_edge or box.y + box.h >= height - 1
    return float(box.area * max(sharpness, 0.0) ** 0.5 * (0.5 if touches_edge else 1.0))


@dataclass
class EventBuilder(Generic[Image]):
    params: EventParams = field(default_factory=EventParams)
    _best: dict[int, Keyframe[Image]] = field(default_factory=dict)

    def is_event(self, track: Track) -> bool:
        p = self.params
        return (
            track.duration >= p.min_seconds
            and track.hits >= p.min_hits
            and track.travel >= p.min_travel * track.mean_diagonal
        )

    def worth_scoring(self, track_id: int, box: Box) -> bool:
        """Whether the pipeline should measure sharpness here: only a box about as large
        as the best one so far can beat it."""
        best = self._best.get(track_id)
        return best is None or box.area >= 0.6 * best.observation.box.area

    def offer(self, track_id: int, observation: Observation, score: float, image: Image) -> None:
        best = self._best.get(track_id)
        if best is None or score > best.score:
            self._best[track_id] = Keyframe(score, observation, image)

    def end(self, track: Track) -> Event[Image] | None:
        """The track ended: its event, or None when it was noise."""
        best = self._best.pop(track.id, None)
        if best is None or not self.is_event(track):
            return None
        return Event(track.id, list(track.observations), best)

    def cut_if_long(self, track: Track) -> Event[Image] | None:
        """A track older than ``max_seconds`` ends its event here and goes on as a new one."""
        if track.duration < self.params.max_seconds:
            return None
        event = self.end(track)
        track.restart()
        return event
