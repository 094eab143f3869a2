"""Frames as the pipeline uses them: clip frames straight from the decoder's planes, and the
output thread that encodes them and hands events on."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from c4c.video.analysis.pictures import ArrayPicture, DecodedPicture
from c4c.video.analysis.pipeline import AnalysisParams, Analyzer, DetectedEvent, OutputThread


def scene(width: int = 64, height: int = 48) -> np.ndarray:
    """A colour gradient with a bright square: every channel varies."""
    y, x = np.mgrid[0:height, 0:width]
    bgr = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1)
    bgr[10:20, 10:20] = (40, 200, 250)
    return bgr.astype(np.uint8)


def as_bgr(frame: av.VideoFrame) -> np.ndarray:
    converted: np.ndarray = cv2.cvtColor(frame.to_ndarray(), cv2.COLOR_YUV2BGR_I420)
    return converted


@pytest.mark.parametrize("form", ["yuv420p", "yuvj420p", "yuv444p", "yuvj422p", "nv12", "rgb24"])
def test_a_clip_frame_has_the_colours_of_the_source_whatever_its_format(form: str) -> None:
    bgr = scene()
    decoded = av.VideoFrame.from_ndarray(bgr, format="bgr24").reformat(format=form)
    reference = as_bgr(ArrayPicture(bgr).clip_frame((32, 24)))
    small = DecodedPicture(decoded).clip_frame((32, 24))
    assert (small.width, small.height, small.format.name) == (32, 24, "yuv420p")
    # Full-range (``j``) sources are squeezed into the video range the encoder expects:
    # taken as they are, they come out too contrasted (a mean error of 8.7 levels here, where
    # the plane-by-plane resize is off by under 2 and swscale's fast bilinear by under 5).
    assert np.abs(as_bgr(small).astype(int) - reference).mean() < 6


@pytest.mark.parametrize("form", ["yuv420p", "yuvj420p", "yuv444p"])
def test_a_clip_frame_reuses_the_analysis_luma_as_it_is(form: str) -> None:
    decoded = DecodedPicture(
        av.VideoFrame.from_ndarray(scene(), format="bgr24").reformat(format=form)
    )
    luma = cv2.resize(decoded.grey(), (32, 24), interpolation=cv2.INTER_LINEAR)
    before = luma.copy()
    reused = decoded.clip_frame((32, 24), luma).to_ndarray()
    assert np.array_equal(reused, decoded.clip_frame((32, 24)).to_ndarray())
    assert np.array_equal(luma, before)  # a full-range luma is mapped in the clip's copy only


def test_a_luma_of_another_size_is_not_reused() -> None:
    """A stream whose frames change size mid-way hands a luma of the old size: the clip frame
    is resized from the picture instead of failing."""
    decoded = DecodedPicture(
        av.VideoFrame.from_ndarray(scene(), format="bgr24").reformat(format="yuv420p")
    )
    stale = np.zeros((12, 16), np.uint8)
    frame = decoded.clip_frame((32, 24), stale).to_ndarray()
    assert np.array_equal(frame, decoded.clip_frame((32, 24)).to_ndarray())


def test_the_output_thread_runs_tasks_in_order_and_reports_a_failure() -> None:
    output = OutputThread("test-output")
    done: list[int] = []
    threads: set[str] = set()

    def task(n: int) -> None:
        threads.add(threading.current_thread().name)
        done.append(n)

    for n in range(100):
        output.submit(lambda n=n: task(n))  # type: ignore[misc]
    output.join()
    assert done == list(range(100))
    assert threads == {"test-output"}

    def fail() -> None:
        raise OSError("disk full")

    output.submit(fail)
    output.submit(lambda: done.append(-1))
    with pytest.raises(OSError, match="disk full"):
        output.join()
    assert done[-1] == 99  # what came after the failure did not run
    output.submit(lambda: done.append(100))  # the failure was reported: work goes on
    output.join()
    assert done[-1] == 100


def test_the_output_thread_takes_tasks_in_batches_or_when_sent() -> None:
    output = OutputThread("test-output", batch=4)
    ran = threading.Event()
    output.submit(ran.set)
    assert output.pending  # one task waits for a batch to fill...
    output.send()  # ...or to be sent
    assert ran.wait(10)
    output.join()


@pytest.mark.skipif(sys.platform != "linux", reason="a thread's own nice value is Linux's")
@pytest.mark.parametrize("niceness", [0, AnalysisParams().output_niceness])
def test_the_output_thread_yields_the_cores_to_the_analysis(niceness: int) -> None:
    output = OutputThread("test-output", niceness=niceness)
    seen: list[int] = []
    output.submit(lambda: seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
    output.join()
    ours = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert seen == [min(19, ours + niceness)]  # 19: the lowest priority there is


def test_a_live_event_goes_out_when_its_clip_ends_not_when_the_stream_does(
    tmp_path: Path,
) -> None:
    """A walker crosses a still scene, then the scene stays still: the event reaches the
    sink once its clip is complete, with no more frames (a paused or quiet stream)."""
    emitted = threading.Event()
    events: list[DetectedEvent] = []

    def sink(event: DetectedEvent) -> None:
        events.append(event)
        emitted.set()

    fps = 10.0
    analyzer = Analyzer(
        AnalysisParams(analysis_fps=0, warmup_frames=5),
        frame_size=(160, 120),
        fps=fps,
        sink=sink,
        clip_dir=tmp_path,
    )
    background = np.full((120, 160, 3), 60, np.uint8)
    frames = [background] * 10
    for step in range(30):  # three seconds of a bright square moving right
        frame = background.copy()
        frame[50:70, 10 + 4 * step : 30 + 4 * step] = 230
        frames.append(frame)
    frames += [background] * 30  # the track ends, then the post-roll
    for index, pixels in enumerate(frames):
        analyzer.process(index, index / fps, ArrayPicture(pixels))
    assert emitted.wait(10)
    assert len(events) == 1
    assert events[0].clip_path is not None
    analyzer.flush()
    assert len(events) == 1
