"""Decoding: PyAV frames read as luma and converted to colour on demand, the OpenCV
fallback, and time-outs on network sources that stop talking."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from c4c.shared.urls import URLPolicy
from c4c.video.analysis import sources
from c4c.video.analysis.pictures import ArrayPicture, DecodedPicture
from c4c.video.analysis.pipeline import (
    AnalysisParams,
    Analyzer,
    DetectedEvent,
    analysis_width,
)
from c4c.video.analysis.sources import (
    ClosedCapture,
    OpenCVCapture,
    PyAVCapture,
    analyse_file,
    open_capture,
)
from c4c.video.service import analysis_params
from c4c.video.settings import VideoSettings

LOOPBACK = URLPolicy(allowed_hosts=("127.0.0.1",))


def first_frames(path: Path, count: int) -> tuple[list[DecodedPicture], list[np.ndarray]]:
    capture = open_capture(str(path))
    assert isinstance(capture, PyAVCapture)
    decoded = []
    while len(decoded) < count and capture.grab():
        picture = capture.retrieve()
        assert isinstance(picture, DecodedPicture)
        decoded.append(picture)
    capture.release()
    reference = cv2.VideoCapture(str(path))
    bgr = [reference.read()[1] for _ in range(count)]
    reference.release()
    return decoded, bgr


@pytest.mark.parametrize("clip", ["vtest.avi", "cockatoo.mp4", "tree.avi"])
def test_decoded_frames_match_opencv_in_grey_and_colour(test_data: Path, clip: str) -> None:
    # vtest: yuv420p, cockatoo: yuv444p (luma read in place); tree: rgb24 (converted).
    decoded, bgr = first_frames(test_data / "video" / clip, 5)
    for picture, reference in zip(decoded, bgr, strict=True):
        height, width = reference.shape[:2]
        assert picture.size == (width, height)
        grey = picture.grey()
        assert grey.shape == (height, width)
        expected = cv2.cvtColor(reference, cv2.COLOR_BGR2GRAY).astype(np.float32)
        # Luma is video range (16-235) where OpenCV's grey is full range: same picture,
        # contrast within 20 %.
        assert np.corrcoef(grey.ravel(), expected.ravel())[0, 1] > 0.98
        colour = picture.colour()
        assert colour.shape == reference.shape
        assert np.abs(colour.astype(np.int16) - reference).mean() < 6
        small = picture.clip_frame((320, 240))
        assert (small.width, small.height, small.format.name) == (320, 240, "yuv420p")
        shrunk = cv2.resize(reference, (320, 240), interpolation=cv2.INTER_AREA)
        small_bgr = cv2.cvtColor(small.to_ndarray(), cv2.COLOR_YUV2BGR_I420)
        assert np.abs(small_bgr.astype(np.int16) - shrunk).mean() < 6


def test_array_pictures_give_grey_colour_and_clip_frames() -> None:
    pixels = np.zeros((90, 160, 3), np.uint8)
    pixels[:, 80:] = (255, 255, 255)
    picture = ArrayPicture(pixels)
    assert picture.size == (160, 90)
    assert picture.grey().shape == (90, 160)
    assert picture.grey()[0, 0] == 0
    assert picture.grey()[0, 159] == 255
    assert picture.colour() is pixels
    small = picture.clip_frame((80, 46))
    assert (small.width, small.height, small.format.name) == (80, 46, "yuv420p")
    luma = small.to_ndarray()[:46]
    assert (luma[0, 0], luma[0, 79]) == (16, 235)  # black and white in video range


def test_analysis_width_follows_the_frame_size() -> None:
    auto = AnalysisParams()
    assert analysis_width(auto, 1920) == 320  # a fifth, at most 320
    assert analysis_width(auto, 1600) == 320
    assert analysis_width(auto, 1280) == 256
    assert analysis_width(auto, 1080) == 216
    assert analysis_width(auto, 768) == 160  # at least 160
    assert analysis_width(auto, 640) == 160
    assert analysis_width(auto, 320) == 160  # not upscaled: the detector caps the scale at 1
    assert analysis_width(AnalysisParams(analysis_width=200), 1280) == 200


@pytest.mark.parametrize(
    ("frame_size", "clip_width", "analysis_size", "clip_size"),
    [
        ((1000, 563), 0, (200, 112), (200, 112)),  # even sides: the analysis frame is a clip's
        ((1280, 720), 0, (256, 144), (256, 144)),
        ((1280, 720), 640, (256, 144), (640, 360)),
        ((150, 101), 0, (150, 101), (150, 100)),  # not downscaled: the clip is resized alone
    ],
)
def test_clips_are_at_the_analysis_size_unless_a_width_is_set(
    frame_size: tuple[int, int],
    clip_width: int,
    analysis_size: tuple[int, int],
    clip_size: tuple[int, int],
) -> None:
    analyzer = Analyzer(
        AnalysisParams(clip_width=clip_width),
        frame_size=frame_size,
        fps=25.0,
        sink=lambda _: None,
        clip_dir=None,
    )
    assert (analyzer.detector.size, analyzer.clip_size) == (analysis_size, clip_size)
    assert analyzer.clip_luma == (analysis_size == clip_size)


def test_clip_settings_reach_the_pipeline_and_tiny_clips_are_refused() -> None:
    params = analysis_params(VideoSettings(clip_width=640, clip_fps=0))
    assert (params.clip_width, params.clip_fps) == (640, 0)
    assert analysis_params(VideoSettings()).clip_width == 0  # the analysis size
    with pytest.raises(ValidationError, match="clip_width"):
        VideoSettings(clip_width=16)


def test_the_opencv_fallback_runs_the_same_pipeline(
    test_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[OpenCVCapture] = []

    def opencv_only(url: str, *_: Any, **__: Any) -> OpenCVCapture:
        capture = OpenCVCapture(cv2.VideoCapture(url))
        opened.append(capture)
        return capture

    monkeypatch.setattr(sources, "open_capture", opencv_only)
    events: list[DetectedEvent] = []
    summary = analyse_file(
        test_data / "video" / "cockatoo.mp4",
        AnalysisParams(analysis_fps=5.0),
        sink=events.append,
        clip_dir=tmp_path,
    )
    assert opened
    assert (summary.frames_decoded, summary.frames_analysed) == (280, 70)
    assert events
    keyframe = cv2.imdecode(np.frombuffer(events[0].keyframe_jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert keyframe.shape == (720, 1280, 3)


class Camera:
    """An HTTP camera that sends ``frames`` MJPEG parts and then, or at once on ``/silent``,
    keeps the connection open without sending anything."""

    def __init__(self, frames: list[bytes]) -> None:
        hold = self.hold = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/silent":
                    hold.wait(30)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                for jpeg in frames:
                    head = b"--frame\r\nContent-Type: image/jpeg\r\n"
                    head += b"Content-Length: %d\r\n\r\n" % len(jpeg)
                    self.wfile.write(head + jpeg + b"\r\n")
                self.wfile.flush()
                hold.wait(30)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.hold.set()
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def unused_port() -> Iterator[int]:
    """A local port that is bound, so no one else takes it, but never listens."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        yield int(bound.getsockname()[1])


@pytest.fixture
def camera(test_data: Path) -> Iterator[Camera]:
    capture = cv2.VideoCapture(str(test_data / "video" / "vtest.avi"))
    frames = [cv2.imencode(".jpg", capture.read()[1])[1].tobytes() for _ in range(10)]
    capture.release()
    server = Camera(frames)
    yield server
    server.close()


def test_a_camera_that_never_answers_is_given_up_after_the_open_timeout(camera: Camera) -> None:
    started = time.monotonic()
    capture = open_capture(
        f"{camera.base}/silent", open_timeout=1.0, read_timeout=1.0, policy=LOOPBACK
    )
    assert isinstance(capture, ClosedCapture)
    assert not capture.isOpened()
    assert time.monotonic() - started < 5.0


def test_a_camera_that_stops_sending_ends_the_source_after_the_read_timeout(
    camera: Camera,
) -> None:
    capture = open_capture(
        f"{camera.base}/live.mjpg", open_timeout=2.0, read_timeout=1.0, policy=LOOPBACK
    )
    assert isinstance(capture, PyAVCapture)
    received = 0
    started = time.monotonic()
    while capture.grab():
        picture = capture.retrieve()
        assert picture is not None
        assert picture.size == (768, 576)
        received += 1
    capture.release()
    assert received == 10
    assert time.monotonic() - started < 6.0


def test_an_unreachable_camera_is_a_closed_capture() -> None:
    with unused_port() as port:
        capture = open_capture(f"http://127.0.0.1:{port}/", open_timeout=2.0, policy=LOOPBACK)
    assert isinstance(capture, ClosedCapture)
