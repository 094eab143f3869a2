"""The pipeline on the real clips of ``../shared/data/video`` (see its SOURCE.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import pytest

from c4c.video.analysis.pictures import ReducedPicture
from c4c.video.analysis.pipeline import AnalysisParams, DetectedEvent
from c4c.video.analysis.sources import (
    FileSummary,
    VideoUnreadable,
    analyse_file,
    decode_reduced,
    open_capture,
)

# People visible in vtest.avi (768x576, 10 fps, a campus walkway), counted by hand: the
# frames at 10, 20, ..., 70 s were saved as PNG and every person on the walkway or the lawn
# was counted, people walking side by side one by one; the tiny figures by the far building
# (a few pixels, under the pipeline's minimum blob area) were not. t=0 is left out: the
# background model is still learning then. Counted: 6, 7, 6, 3, 4, 6, 8 = 40.
HAND_COUNT = {10: 6, 20: 7, 30: 6, 40: 3, 50: 4, 60: 6, 70: 8}
# Background subtraction sees a group walking shoulder to shoulder as one blob (at 10 s
# and 50 s two and three people do), so tracks undercount crowds: within 30 % overall and
# 3 people at each instant.
TOTAL_TOLERANCE = 0.3
INSTANT_TOLERANCE = 3


def run(path: Path, tmp_path: Path, **overrides: Any) -> tuple[list[DetectedEvent], FileSummary]:
    events: list[DetectedEvent] = []
    params = AnalysisParams(**overrides)
    clips = tmp_path / "clips"
    clips.mkdir(exist_ok=True)
    summary = analyse_file(path, params, sink=events.append, clip_dir=clips)
    return events, summary


def test_pedestrians_are_tracked_about_as_a_person_counts_them(
    test_data: Path, tmp_path: Path
) -> None:
    events, summary = run(test_data / "video" / "vtest.avi", tmp_path)
    assert summary.frames_decoded == 795
    tracked = {t: sum(1 for e in events if e.start <= t <= e.end) for t in HAND_COUNT}
    expected = sum(HAND_COUNT.values())
    assert abs(sum(tracked.values()) - expected) <= TOTAL_TOLERANCE * expected, tracked
    for t, people in HAND_COUNT.items():
        assert abs(tracked[t] - people) <= INSTANT_TOLERANCE, (t, tracked)
    # Every event has a keyframe that decodes and a clip that plays.
    for event in events:
        keyframe = cv2.imdecode(np.frombuffer(event.keyframe_jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert keyframe.shape == (576, 768, 3)
        assert event.clip_path is not None
    clip = cv2.VideoCapture(str(events[0].clip_path))
    assert clip.isOpened()
    assert clip.grab()


def test_clips_are_h264_mp4_that_browsers_play_while_downloading(
    test_data: Path, tmp_path: Path
) -> None:
    events, _ = run(test_data / "video" / "cockatoo.mp4", tmp_path)
    assert events
    path = events[0].clip_path
    assert path is not None
    with av.open(str(path)) as clip:
        stream = clip.streams.video[0]
        assert (stream.codec_context.name, stream.codec_context.pix_fmt) == ("h264", "yuv420p")
        assert sum(1 for _ in clip.decode(stream)) > 0
    data = path.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")  # the index first: "fast start"


def test_a_moving_bird_makes_events(test_data: Path, tmp_path: Path) -> None:
    events, _ = run(test_data / "video" / "cockatoo.mp4", tmp_path)
    assert events
    assert all(e.end - e.start >= 1.0 for e in events)


def test_clips_reuse_the_analysis_frame_at_the_clip_rate(test_data: Path, tmp_path: Path) -> None:
    # Every frame of the 20 fps clip is analysed; clips get at most 10 a second, so a clip
    # plays in real time: never longer than the 15 s a clip may last (plus its pre-roll).
    events, summary = run(test_data / "video" / "cockatoo.mp4", tmp_path, analysis_fps=0)
    assert summary.frames_analysed == 280
    clips = {e.clip_path for e in events if e.clip_path is not None}
    assert clips
    for path in clips:
        clip = cv2.VideoCapture(str(path))
        assert clip.get(cv2.CAP_PROP_FPS) == pytest.approx(10.0)
        assert (clip.get(cv2.CAP_PROP_FRAME_WIDTH), clip.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (
            256,
            144,
        )
        frames = 0
        while clip.grab():
            frames += 1
        assert 10 <= frames <= 10 * (15 + 1)


def test_a_scene_busy_all_along_gets_back_to_back_clips_at_the_analysis_size(
    test_data: Path, tmp_path: Path
) -> None:
    # vtest.avi has people on screen nearly all its 79.5 s at 10 fps, past the 15 s a clip
    # may last: clips follow one another, each frame encoded in one of them only.
    events, summary = run(test_data / "video" / "vtest.avi", tmp_path)
    clips = {e.clip_path for e in events if e.clip_path is not None}
    assert len(clips) >= 79.5 / 15
    encoded = 0
    for path in clips:
        with av.open(str(path)) as clip:
            stream = clip.streams.video[0]
            # The analysis frame of 768x576 (160 px wide, the least) is the clip's luma.
            assert (stream.codec_context.name, stream.width, stream.height) == ("h264", 160, 120)
            assert stream.average_rate == 10
            times = [float(frame.time) for frame in clip.decode(stream)]
        assert 10 <= len(times) <= 10 * 15
        assert times == pytest.approx([n / 10 for n in range(len(times))])  # plays at 10 fps
        encoded += len(times)
    assert 0.9 * summary.frames_analysed <= encoded <= summary.frames_analysed


def test_an_event_reaches_the_sink_once_its_clip_is_complete(
    test_data: Path, tmp_path: Path
) -> None:
    # Keyframes are encoded as their events end, but an event is handed over only when the
    # clip its segment shares is finished: the sink can serve it at once. A clip still
    # being written has no index yet (it goes first, "faststart", when the file is closed).
    clip_frames: list[int] = []

    def sink(event: DetectedEvent) -> None:
        assert event.clip_path is not None
        with av.open(str(event.clip_path)) as clip:
            clip_frames.append(sum(1 for _ in clip.decode(video=0)))

    clips = tmp_path / "clips"
    clips.mkdir()
    analyse_file(test_data / "video" / "vtest.avi", AnalysisParams(), sink=sink, clip_dir=clips)
    assert len(clip_frames) > 10
    assert min(clip_frames) >= 10


def mjpeg_copy(source: Path, target: Path, size: tuple[int, int]) -> Path:
    """``source`` as an MJPEG camera would send it: every frame a JPEG of its own."""
    with av.open(str(source)) as clip, av.open(str(target), "w") as out:
        stream = out.add_stream("mjpeg", rate=clip.streams.video[0].average_rate)
        stream.width, stream.height = size
        stream.pix_fmt = "yuvj420p"
        for frame in clip.decode(video=0):
            out.mux(stream.encode(frame.reformat(*size, "yuvj420p")))
        out.mux(stream.encode(None))
    return target


def test_mjpeg_is_decoded_at_the_analysis_size_and_keyframes_at_full_size(
    test_data: Path, tmp_path: Path
) -> None:
    clip = mjpeg_copy(test_data / "video" / "cockatoo.mp4", tmp_path / "bird.avi", (640, 360))
    capture = open_capture(str(clip))
    decode_reduced(capture, AnalysisParams())
    assert capture.grab()
    picture = capture.retrieve()
    assert isinstance(picture, ReducedPicture)
    # A quarter of the width, by the JPEG decoder: the 160 px analysis needs no resize.
    assert (picture.size, picture.grey().shape) == ((640, 360), (90, 160))
    full = next(av.open(str(clip)).decode(video=0)).to_ndarray(format="bgr24")
    assert np.array_equal(picture.colour(), full)  # decoded again from the frame's packet
    capture.release()

    events, summary = run(clip, tmp_path, analysis_fps=0)
    assert summary.frames_analysed == 280
    assert events
    for event in events:
        keyframe = cv2.imdecode(np.frombuffer(event.keyframe_jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert keyframe.shape == (360, 640, 3)
        assert event.frame_size == (640, 360)
    # Boxes are in the source's pixels, not the reduced frame's.
    right = [o.box.x + o.box.w for event in events for o in event.boxes]
    assert 160 < max(right) <= 640


def test_an_empty_scene_makes_no_event(test_data: Path, tmp_path: Path) -> None:
    events, summary = run(
        test_data / "video" / "empty_scene_synthetic.avi", tmp_path, analysis_fps=0
    )
    assert summary.frames_analysed == 150
    assert events == []
    assert list((tmp_path / "clips").iterdir()) == []


def test_frame_skipping_analyses_the_target_rate(test_data: Path, tmp_path: Path) -> None:
    _, summary = run(test_data / "video" / "cockatoo.mp4", tmp_path, analysis_fps=5.0)
    assert summary.frames_decoded == 280
    assert summary.frames_analysed == 70  # 14 s at 5 fps


def test_a_truncated_clip_is_refused_with_the_reason(test_data: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.avi"
    data = (test_data / "video" / "vtest.avi").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoUnreadable, match="truncated"):
        run(cut, tmp_path)


@pytest.mark.parametrize("content", [b"", b"not a video at all" * 100])
def test_garbage_is_refused_with_the_reason(tmp_path: Path, content: bytes) -> None:
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(content)
    with pytest.raises(VideoUnreadable, match="not a readable video"):
        run(junk, tmp_path)


def test_an_mp4_cut_before_its_index_is_refused(test_data: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.mp4"
    cut.write_bytes((test_data / "video" / "cockatoo.mp4").read_bytes()[:300_000])
    with pytest.raises(VideoUnreadable, match="not a readable video"):
        run(cut, tmp_path)
