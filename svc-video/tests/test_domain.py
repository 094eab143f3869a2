"""The plain-Python core: tracker, events, counters — hand-made boxes, no OpenCV."""

from __future__ import annotations

import pytest

from c4c.video.analysis.counting import Counters, LineCounter, ZoneCounter, inside
from c4c.video.analysis.events import EventBuilder, EventParams, keyframe_score
from c4c.video.analysis.pipeline import RateGate
from c4c.video.analysis.sources import Backoff
from c4c.video.analysis.tracking import Box, Tracker, TrackerParams


def walk(start: float, step: float, frames: int, y: float = 100.0) -> list[Box]:
    return [Box(start + step * i, y, 20, 40) for i in range(frames)]


def test_box_geometry() -> None:
    a, b = Box(0, 0, 10, 10), Box(5, 0, 10, 10)
    assert a.iou(b) == pytest.approx(50 / 150)
    assert a.iou(Box(20, 20, 5, 5)) == 0.0
    assert a.distance(b) == pytest.approx(5.0)


def test_two_walkers_keep_their_ids_while_crossing_paths() -> None:
    tracker = Tracker()
    left, right = walk(0, 6, 30), walk(174, -6, 30, y=110)
    ids: dict[int, set[int]] = {}
    for frame in range(30):
        update = tracker.update(frame, frame / 10, [left[frame], right[frame]])
        for track in update.active:
            ids.setdefault(track.id, set()).add(round(track.last.box.x))
    assert len(tracker.tracks) == 2
    [first, second] = tracker.tracks
    assert first.last.box.x > first.first.box.x  # the left walker went right
    assert second.last.box.x < second.first.box.x
    assert first.hits == second.hits == 30


def test_matching_takes_the_best_overlap_first_then_the_nearest_leftover() -> None:
    tracker = Tracker()
    tracker.update(0, 0.0, [Box(0, 0, 10, 10), Box(100, 0, 10, 10)])
    # Box 1 overlaps track 1 best (IoU 0.82; box 0: 0.54); box 2 only touches track 2
    # (IoU 0), but its centre is 0.7 diagonals away; box 0 is left for a new track.
    update = tracker.update(1, 0.1, [Box(3, 0, 10, 10), Box(1, 0, 10, 10), Box(110, 0, 10, 10)])
    assert [(t.id, t.last.box.x) for t in update.active] == [(1, 1), (2, 110), (3, 3)]
    # A far box is a new track unless IoU alone decides (threshold 0): then it is matched.
    far = [Box(500, 0, 10, 10)]
    assert [t.id for t in tracker.update(2, 0.2, far).active] == [4]
    anywhere = Tracker(TrackerParams(iou_threshold=0.0, max_distance=0.0))
    anywhere.update(0, 0.0, [Box(0, 0, 10, 10)])
    assert [t.id for t in anywhere.update(1, 0.1, far).active] == [1]


def test_a_track_survives_a_short_occlusion_and_ends_after_max_lost() -> None:
    tracker = Tracker(TrackerParams(max_lost=2))
    boxes = walk(0, 5, 10)
    for frame in range(5):
        tracker.update(frame, frame / 10, [boxes[frame]])
    tracker.update(5, 0.5, [])  # hidden for two frames
    tracker.update(6, 0.6, [])
    update = tracker.update(7, 0.7, [boxes[7]])  # predicted position still matches
    assert [t.id for t in update.active] == [1]
    ended = []
    for frame in range(8, 12):
        ended += tracker.update(frame, frame / 10, []).ended
    assert [t.id for t in ended] == [1]
    assert tracker.tracks == []


def test_events_need_time_hits_and_movement() -> None:
    builder: EventBuilder[str] = EventBuilder(EventParams(min_seconds=1.0, min_hits=4))
    tracker = Tracker()
    for frame, box in enumerate(walk(0, 8, 15)):
        for track in tracker.update(frame, frame / 10, [box]).active:
            builder.offer(track.id, track.last, keyframe_score(box, 100.0, (640, 480)), f"f{frame}")
    [walker] = tracker.flush()
    event = builder.end(walker)
    assert event is not None
    assert event.start.t == 0.0
    assert event.end.t == pytest.approx(1.4)
    assert event.keyframe.image == "f1"  # frame 0 touches the edge: its score is halved

    still = Tracker()
    for frame in range(15):
        for track in still.update(frame, frame / 10, [Box(100, 100, 20, 40)]).active:
            builder.offer(track.id, track.last, 1.0, "x")
    [standing] = still.flush()
    assert builder.end(standing) is None  # lived long enough but never moved

    short = Tracker()
    for frame, box in enumerate(walk(0, 8, 5)):
        for track in short.update(frame, frame / 10, [box]).active:
            builder.offer(track.id, track.last, 1.0, "x")
    assert builder.end(short.flush()[0]) is None  # 0.4 s is noise


def test_long_tracks_are_cut_into_events() -> None:
    builder: EventBuilder[int] = EventBuilder(EventParams(min_seconds=1.0, max_seconds=3.0))
    tracker = Tracker()
    events = []
    for frame, box in enumerate(walk(0, 3, 100)):
        for track in tracker.update(frame, frame / 10, [box]).active:
            builder.offer(track.id, track.last, box.area, frame)
            event = builder.cut_if_long(track)
            if event is not None:
                events.append(event)
    assert len(events) == 3
    assert all(e.end.t - e.start.t == pytest.approx(3.0) for e in events)


def test_line_counter_counts_each_direction_once_per_track() -> None:
    line = LineCounter("gate", (0.5, 0.0), (0.5, 1.0))
    counters = Counters(lines=[line])
    for x in (0.3, 0.4, 0.6, 0.7):  # left to right, i.e. from the line's left to its right?
        counters.observe(1, (x, 0.5))
    for x in (0.7, 0.6, 0.4):
        counters.observe(2, (x, 0.5))
    counters.observe(1, (0.4, 0.5))  # track 1 goes back
    counters.observe(1, (0.6, 0.5))  # and across again: not counted twice
    summary = line.summary()
    assert summary["forward"] + summary["backward"] == 3
    assert summary["forward"] == 2 or summary["backward"] == 2


def test_zone_counter_counts_entries_and_occupancy() -> None:
    square = [(0.2, 0.2), (0.8, 0.2), (0.8, 0.8), (0.2, 0.8)]
    assert inside(square, (0.5, 0.5))
    assert not inside(square, (0.9, 0.5))
    zone = ZoneCounter("pond", square)
    counters = Counters(zones=[zone])
    counters.observe(1, (0.1, 0.5))
    counters.observe(1, (0.5, 0.5))
    counters.observe(2, (0.5, 0.6))
    assert zone.summary() == {"entered": 2, "occupancy": 2}
    counters.observe(1, (0.9, 0.5))
    counters.observe(1, (0.5, 0.5))  # back in: still one entry
    counters.forget(2)
    assert zone.summary() == {"entered": 2, "occupancy": 1}


def test_rate_gate_keeps_the_target_rate() -> None:
    gate = RateGate(5.0)
    kept = [i for i in range(100) if gate.due(i / 25)]  # 25 fps source, 4 s
    assert len(kept) == 20
    every = RateGate(0.0)
    assert all(every.due(i / 25) for i in range(10))


def test_backoff_grows_to_its_ceiling() -> None:
    backoff = Backoff(initial=0.5, maximum=4.0)
    delays = [backoff.delay(n) for n in range(1, 8)]
    assert 0.25 <= delays[0] <= 0.5
    assert all(2.0 <= d <= 4.0 for d in delays[4:])
