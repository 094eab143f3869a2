"""Where frames come from: a clip on disk (every frame decoded, as fast as possible) or a
live stream (real time: reconnects with backoff, skips frames when analysis falls behind).

Each source runs a reader thread that decodes while the analysis thread analyses, so the
two use both cores: OpenCV's decode and image calls release the GIL.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2

from c4c.video.analysis.counting import Counters
from c4c.video.analysis.pipeline import AnalysisParams, Analyzer, EventSink, Frame, RateGate

log = logging.getLogger("c4c.video.sources")

DEFAULT_FPS = 25.0  # when a container or stream does not say
TRUNCATION_TOLERANCE = 0.9  # fewer decodable frames than this share of the declared ones


class Cancelled(Exception):
    """The caller asked the analysis to stop."""


class VideoUnreadable(Exception):
    """The clip cannot be analysed; ``str(exc)`` says why, for the job record."""


@dataclass(slots=True)
class FrameStats:
    """What a source did with its frames; read by metrics and status from other threads."""

    decoded: int = 0
    analysed: int = 0
    skipped: int = 0  # decoded but not analysed: frame-rate target or backpressure
    dropped_late: int = 0  # of skipped: analysis was behind real time
    reconnects: int = 0
    lag: float = 0.0  # seconds between a frame's arrival and the end of its analysis
    analysis_fps: float = 0.0


class FrameObserver:
    """Hook for metrics; the default counts nothing."""

    def decoded(self, n: int = 1) -> None: ...
    def analysed(self, n: int = 1) -> None: ...
    def skipped(self, n: int = 1) -> None: ...
    def dropped_late(self, n: int = 1) -> None: ...
    def reconnected(self) -> None: ...
    def lag(self, seconds: float) -> None: ...
    def fps(self, value: float) -> None: ...
    def status(self, status: str) -> None: ...


def open_capture(url: str, open_timeout: float = 10.0, read_timeout: float = 10.0) -> Any:
    """An FFmpeg-backed capture with timeouts, so a dead source cannot hang a thread."""
    return cv2.VideoCapture(
        url,
        cv2.CAP_FFMPEG,
        [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
            int(open_timeout * 1000),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC,
            int(read_timeout * 1000),
        ],
    )


def _fps(capture: Any) -> float:
    fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
    return float(fps) if math.isfinite(fps) and 0 < fps < 1000 else DEFAULT_FPS


@dataclass(frozen=True, slots=True)
class FileSummary:
    fps: float
    width: int
    height: int
    frames_declared: int
    frames_decoded: int
    frames_analysed: int
    detections: int

    @property
    def duration(self) -> float:
        return self.frames_decoded / self.fps


_END = object()


def analyse_file(
    path: Path,
    params: AnalysisParams,
    *,
    sink: EventSink,
    clip_dir: Path | None,
    progress: Callable[[int, int], None] | None = None,
    cancelled: threading.Event | None = None,
    observer: FrameObserver | None = None,
    queue_size: int = 8,
) -> FileSummary:
    """Analyse every frame of a clip due by ``params.analysis_fps``; raises
    :class:`VideoUnreadable` when it is not a video, or decoding stops early."""
    observer = observer or FrameObserver()
    cancelled = cancelled or threading.Event()
    capture = open_capture(str(path))
    if not capture.isOpened():
        raise VideoUnreadable(
            "not a readable video: no container or codec that FFmpeg can open was found "
            "(corrupt, truncated before its index, or not a video)"
        )
    fps = _fps(capture)
    width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
    height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    declared = max(0, int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0))
    frames: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
    gate = RateGate(params.analysis_fps)
    counts = {"decoded": 0}
    failure: list[BaseException] = []
    leaving = threading.Event()  # the analysis thread stopped: the reader stops too

    def read() -> None:
        try:
            index = 0
            while not (cancelled.is_set() or leaving.is_set()) and capture.grab():
                counts["decoded"] += 1
                observer.decoded()
                t = index / fps
                if gate.due(t):
                    ok, frame = capture.retrieve()
                    if ok:
                        frames.put((index, t, frame))
                else:
                    observer.skipped()
                index += 1
        except BaseException as exc:  # handed to the analysis thread
            failure.append(exc)
        finally:
            capture.release()
            frames.put(_END)

    reader = threading.Thread(target=read, name=f"decode:{path.name}", daemon=True)
    analyzer: Analyzer | None = None
    analysed = 0
    reader.start()
    try:
        last_report = 0.0
        while True:
            item = frames.get()
            if item is _END:
                break
            index, t, frame = item
            if analyzer is None:
                height, width = frame.shape[:2]
                analyzer = Analyzer(
                    params, frame_size=(width, height), fps=fps, sink=sink, clip_dir=clip_dir
                )
            analyzer.process(index, t, frame)
            analysed += 1
            observer.analysed()
            now = time.monotonic()
            if progress is not None and now - last_report >= 0.5:
                last_report = now
                progress(counts["decoded"], declared)
    finally:
        leaving.set()
        while reader.is_alive():
            with contextlib.suppress(queue.Empty):
                frames.get(timeout=0.1)
        reader.join()
    if cancelled.is_set():
        raise Cancelled("stopped before the end of the clip")
    if failure:
        raise VideoUnreadable(f"decoding failed: {failure[0]!r}")
    decoded = counts["decoded"]
    if decoded == 0 or analyzer is None:
        raise VideoUnreadable("the file opened as a video but no frame could be decoded")
    if declared and decoded < TRUNCATION_TOLERANCE * declared:
        analyzer.flush()
        raise VideoUnreadable(
            f"decoding stopped at frame {decoded} of the {declared} the container declares: "
            "the file is truncated or partly corrupt"
        )
    analyzer.flush()
    if progress is not None:
        progress(decoded, declared)
    return FileSummary(fps, width, height, declared, decoded, analysed, analyzer.detections)


@dataclass(frozen=True, slots=True)
class Backoff:
    initial: float = 0.5
    maximum: float = 30.0
    max_attempts: int = 0  # failed opens in a row before giving up; 0 = never give up

    def delay(self, attempt: int) -> float:
        """Exponential with full jitter's upper half, so many cameras do not retry in step."""
        ceiling = min(self.maximum, self.initial * 2.0 ** max(0, attempt - 1))
        return float(ceiling * (0.5 + random.random() / 2))


StatusCallback = Callable[[str, str | None], None]
"""(status, reason): running, reconnecting, paused, failed, stopped."""


class StreamWorker:
    """A live source: one reader thread draining the stream in real time and one analysis
    thread taking the newest due frame. When analysis is slower than the stream, the reader
    overwrites the frame waiting in the one-slot mailbox (a skipped frame) instead of queueing
    without bound, and ``stats.lag`` shows how far behind analysis is."""

    def __init__(
        self,
        name: str,
        url: str,
        params: AnalysisParams,
        *,
        sink: EventSink,
        clip_dir: Path | None,
        on_status: StatusCallback,
        counters: Counters | None = None,
        backoff: Backoff | None = None,
        observer: FrameObserver | None = None,
        opener: Callable[[str], Any] = open_capture,
        paused: bool = False,
    ) -> None:
        self.name = name
        self.url = url
        self.params = params
        self.sink = sink
        self.clip_dir = clip_dir
        self.on_status = on_status
        self.counters = counters or Counters()
        self.backoff = backoff or Backoff()
        self.observer = observer or FrameObserver()
        self.opener = opener
        self.stats = FrameStats()
        self.latest: Frame | None = None
        self.status = "starting"
        self._paused = threading.Event()
        if paused:
            self._paused.set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"stream:{name}", daemon=True)
        self._analyzer: Analyzer | None = None
        self._origin = time.monotonic()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def pause(self, paused: bool) -> None:
        """Takes effect at the next frame; the worker's own thread reports the status."""
        if paused:
            self._paused.set()
        else:
            self._paused.clear()

    def _report_pause(self) -> None:
        state = "paused" if self._paused.is_set() else "running"
        if self.status in ("running", "paused") and self.status != state:
            self._set_status(state, None)

    def _set_status(self, status: str, reason: str | None) -> None:
        self.status = status
        self.observer.status(status)
        try:
            self.on_status(status, reason)
        except Exception:
            log.exception("stream status callback failed", extra={"stream": self.name})

    def _run(self) -> None:
        failures = 0
        try:
            while not self._stop.is_set():
                capture = self.opener(self.url)
                if not capture.isOpened():
                    capture.release()
                    failures += 1
                    if self.backoff.max_attempts and failures >= self.backoff.max_attempts:
                        self._set_status(
                            "failed", f"could not open the stream after {failures} attempts"
                        )
                        return
                    self._set_status("reconnecting", "the stream could not be opened")
                    self._stop.wait(self.backoff.delay(failures))
                    continue
                if self.stats.decoded:  # it had frames before: this is a reconnection
                    self.stats.reconnects += 1
                    self.observer.reconnected()
                received = self._consume(capture)
                if received:
                    failures = 0
                if self._stop.is_set():
                    break
                failures += 1
                self._set_status("reconnecting", "the stream ended or stopped sending frames")
                self._stop.wait(self.backoff.delay(failures))
        except Exception as exc:
            log.exception("stream worker crashed", extra={"stream": self.name})
            self._set_status("failed", f"internal error: {exc!r}")
            return
        finally:
            if self._analyzer is not None:
                self._analyzer.flush()
        self._set_status("stopped", None)

    def _consume(self, capture: Any) -> int:
        """Read the stream until it ends; returns how many frames arrived."""
        fps = _fps(capture)
        mailbox: list[tuple[int, float, float, Frame] | None] = [None]
        ready = threading.Condition()
        done = threading.Event()
        gate = RateGate(self.params.analysis_fps)
        received = 0

        def read() -> None:
            nonlocal received
            try:
                while not self._stop.is_set() and capture.grab():
                    received += 1
                    self.stats.decoded += 1
                    self.observer.decoded()
                    arrived = time.monotonic()
                    t = arrived - self._origin
                    if not gate.due(t):
                        self.stats.skipped += 1
                        self.observer.skipped()
                        continue
                    if self._paused.is_set():  # keep the snapshot fresh, analyse nothing
                        ok, frame = capture.retrieve()
                        if ok:
                            self.latest = frame
                        self.stats.skipped += 1
                        self.observer.skipped()
                        continue
                    ok, frame = capture.retrieve()
                    if not ok:
                        continue
                    self.latest = frame
                    with ready:
                        if mailbox[0] is not None:  # analysis is behind: skip, do not queue
                            self.stats.skipped += 1
                            self.stats.dropped_late += 1
                            self.observer.skipped()
                            self.observer.dropped_late()
                        mailbox[0] = (self.stats.decoded, t, arrived, frame)
                        ready.notify()
            finally:
                capture.release()
                done.set()
                with ready:
                    ready.notify()

        reader = threading.Thread(target=read, name=f"decode:{self.name}", daemon=True)
        reader.start()
        window_start, window_frames = time.monotonic(), 0
        first = True
        try:
            while True:
                with ready:
                    while mailbox[0] is None and not done.is_set():
                        ready.wait(0.5)
                        if mailbox[0] is None and not first:
                            break  # nothing due (paused?): report the state, then wait on
                    item, mailbox[0] = mailbox[0], None
                if item is None and not done.is_set():
                    self._report_pause()
                    continue
                if item is None:
                    break
                if first:
                    first = False
                    self._set_status("paused" if self._paused.is_set() else "running", None)
                self._report_pause()
                index, t, arrived, frame = item
                if self._analyzer is None:
                    height, width = frame.shape[:2]
                    self._analyzer = Analyzer(
                        self.params,
                        frame_size=(width, height),
                        fps=fps,
                        sink=self.sink,
                        clip_dir=self.clip_dir,
                        counters=self.counters,
                    )
                self._analyzer.process(index, t, frame)
                self.stats.analysed += 1
                self.observer.analysed()
                self.stats.lag = time.monotonic() - arrived
                self.observer.lag(self.stats.lag)
                window_frames += 1
                elapsed = time.monotonic() - window_start
                if elapsed >= 2.0:
                    self.stats.analysis_fps = window_frames / elapsed
                    self.observer.fps(self.stats.analysis_fps)
                    window_start, window_frames = time.monotonic(), 0
        finally:
            reader.join()
            if self._analyzer is not None:
                self._analyzer.flush()  # tracks do not survive a gap in the stream
        return received
