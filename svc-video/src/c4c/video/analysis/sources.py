"""Where frames come from: a clip on disk (every frame decoded, as fast as possible) or a
live stream (real time: reconnects with backoff, skips frames when analysis falls behind).

Decoding is PyAV's (FFmpeg): frames stay YUV and the analysis reads their luma plane, so
no frame pays for a full-size colour conversion it does not need, and MJPEG frames are
decoded at about the analysis size (see ``PyAVCapture.reduce``); OpenCV is the fallback
for inputs PyAV cannot decode. Each source runs a reader thread that decodes while the
analysis thread analyses, so the two use both cores: FFmpeg and OpenCV release the GIL.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import random
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import av
import av.container
import cv2
import httpx
from av.video.stream import VideoStream

from c4c.shared.urls import UnsafeURL, URLPolicy
from c4c.video.analysis.counting import Counters
from c4c.video.analysis.guarded_io import GuardedOpener
from c4c.video.analysis.pictures import ArrayPicture, DecodedPicture, Picture, ReducedPicture
from c4c.video.analysis.pipeline import (
    AnalysisParams,
    Analyzer,
    EventSink,
    Prepared,
    RateGate,
    analysis_width,
)

log = logging.getLogger("c4c.video.sources")

DEFAULT_FPS = 25.0  # when a container or stream does not say
NO_EXCEPTIONS = URLPolicy()  # public addresses only, no file:// URLs
TRUNCATION_TOLERANCE = 0.9  # fewer decodable frames than this share of the declared ones
# A clip's reader hands frames to the analysis thread this many at a time: a hand-off may
# wake a thread (a condition, a context switch). With the output thread's batches, vtest.avi
# went from 2.6 voluntary context switches a frame to 1.4.
FRAME_BATCH = 4


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


class Capture(Protocol):
    """An opened source: ``grab`` decodes the next frame, ``retrieve`` hands it over."""

    @property
    def fps(self) -> float: ...
    @property
    def frames_declared(self) -> int: ...
    @property
    def refusal(self) -> str | None:
        """Why the URL policy refused the source (or a part of it), if it did."""

    def isOpened(self) -> bool: ...  # noqa: N802 - OpenCV's name
    def grab(self) -> bool: ...
    def retrieve(self) -> Picture | None: ...
    def release(self) -> None: ...


# Intra-only codecs whose FFmpeg decoder scales the DCT (``lowres``: 1/2, 1/4 or 1/8 of the
# width): a frame is decoded straight at about the analysis size (see ``ReducedPicture``).
# MJPEG is what HTTP cameras send; 640x360 decoded at 160x90 costs 0.30 ms, not 0.45 + a resize.
REDUCIBLE_CODECS = frozenset({"mjpeg"})
MAX_REDUCTION = 3  # FFmpeg's ``lowres`` at most: 1/8


def _rate(fps: float) -> float:
    return float(fps) if math.isfinite(fps) and 0 < fps < 1000 else DEFAULT_FPS


class PyAVCapture:
    """FFmpeg through PyAV: frames stay in YUV until a use asks for colour (see
    :mod:`c4c.video.analysis.pictures`). A packet that does not decode is skipped, like
    OpenCV does; a read error or time-out ends the source."""

    def __init__(
        self, container: av.container.InputContainer, guard: GuardedOpener | None = None
    ) -> None:
        self.container = container
        self.guard = guard
        self.stream = container.streams.video[0]
        # FFmpeg decodes on the reader thread alone (slice threads at most): the analysis
        # thread has the other core, and frame threads only added CPU time in the bench.
        self.stream.thread_type = "SLICE"
        self.fps = _rate(float(self.stream.average_rate or self.stream.guessed_rate or 0))
        self.frames_declared = self.stream.frames or self._estimated_frames()
        self._frames = self._decode()
        self._frame: av.VideoFrame | None = None
        self._packet: av.Packet[VideoStream] | None = None
        self._full_size: tuple[int, int] | None = None  # when frames are decoded reduced

    def reduce(self, width: int) -> None:
        """Decode frames at the smallest DCT-scaled size still ``width`` pixels wide, when
        the codec can and nothing was decoded yet; a no-op otherwise."""
        context = self.stream.codec_context
        if context.name not in REDUCIBLE_CODECS or context.is_open:
            return
        factor = 0
        while factor < MAX_REDUCTION and -(-context.width >> (factor + 1)) >= width:
            factor += 1
        if factor:
            context.options = {**context.options, "lowres": str(factor)}
            self._full_size = (context.width, context.height)

    def _estimated_frames(self) -> int:
        """Containers without a frame count (MPEG-PS, streams): from the duration, if any."""
        stream, seconds = self.stream, 0.0
        if stream.duration is not None and stream.time_base is not None:
            seconds = float(stream.duration * stream.time_base)
        elif self.container.duration is not None:
            seconds = self.container.duration / av.time_base
        return max(0, int(seconds * self.fps))

    def _decode(self) -> Generator[tuple[av.VideoFrame, av.Packet[VideoStream]]]:
        for packet in self.container.demux(self.stream):
            try:
                frames = packet.decode()
            except av.error.InvalidDataError:  # a damaged packet: the next keyframe recovers
                continue
            for frame in frames:
                if isinstance(frame, av.VideoFrame):
                    yield frame, packet

    def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
        return True

    def grab(self) -> bool:
        try:
            self._frame, self._packet = next(self._frames, (None, None))
        except (av.FFmpegError, OSError, UnsafeURL) as exc:  # read error, time-out, reset
            log.info("source stopped: %s", exc)
            self._frame = None
        if self.refusal is not None:  # a part was refused: the source ends there
            self._frame = None
        return self._frame is not None

    @property
    def refusal(self) -> str | None:
        return self.guard.refusal if self.guard is not None else None

    def retrieve(self) -> Picture | None:
        frame, packet = self._frame, self._packet
        if frame is None:
            return None
        if self._full_size is not None and packet is not None:
            return ReducedPicture(frame, packet, self.stream.codec_context.name, self._full_size)
        return DecodedPicture(frame)

    def release(self) -> None:
        self._frame = self._packet = None
        self._frames.close()
        self.container.close()
        if self.guard is not None:
            self.guard.close()


def decode_reduced(capture: Capture, params: AnalysisParams) -> None:
    """Let a source that can decode its frames small do so, as far as analysis and clips
    allow."""
    if isinstance(capture, PyAVCapture):
        width = capture.stream.codec_context.width
        capture.reduce(max(analysis_width(params, width), params.clip_width))


class OpenCVCapture:
    """The fallback for what PyAV cannot open: OpenCV's own FFmpeg build, BGR frames."""

    def __init__(self, capture: Any) -> None:
        self.capture = capture
        self.fps = _rate(float(capture.get(cv2.CAP_PROP_FPS) or 0.0))
        self.frames_declared = max(0, int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0))
        self.refusal: str | None = None  # opens local files only

    def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
        return bool(self.capture.isOpened())

    def grab(self) -> bool:
        return bool(self.capture.grab())

    def retrieve(self) -> Picture | None:
        ok, pixels = self.capture.retrieve()
        return ArrayPicture(pixels) if ok else None

    def release(self) -> None:
        self.capture.release()


class ClosedCapture:
    """A source that did not open (refused, unreachable, not a video)."""

    fps = DEFAULT_FPS
    frames_declared = 0

    def __init__(self, refusal: str | None = None) -> None:
        self.refusal = refusal

    def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
        return False

    def grab(self) -> bool:
        return False

    def retrieve(self) -> Picture | None:
        return None

    def release(self) -> None:
        return None


# PyAV errors that say the input is not something it can decode, as opposed to a source
# that is unreachable, slow or refusing: only those are worth a second try with OpenCV.
_UNSUPPORTED = (
    av.error.InvalidDataError,
    av.error.DecoderNotFoundError,
    av.error.DemuxerNotFoundError,
    av.error.PatchWelcomeError,
    IndexError,  # no video stream
)


def open_capture(
    url: str,
    open_timeout: float = 10.0,
    read_timeout: float = 10.0,
    policy: URLPolicy = NO_EXCEPTIONS,
) -> Capture:
    """Open a file path or an already-checked URL with time-outs, so a dead source cannot
    hang a thread. Every URL FFmpeg opens for it, the first and all it names, must pass
    ``policy`` (see :mod:`c4c.video.analysis.guarded_io`). OpenCV gets a second try only
    for local files PyAV says it cannot decode: OpenCV's FFmpeg would open URLs unguarded."""
    options = {
        # HLS would reuse a segment's connection through FFmpeg's own HTTP client, which
        # the guarded files are not (FFmpeg aborts the process when asked to).
        "http_persistent": "0",
    }
    if url.lower().startswith("rtsp"):
        # RTSP is FFmpeg's own client, which io_open does not see: the host was checked
        # (check_url) but FFmpeg resolves it again and follows RTSP redirects unchecked.
        # Deployments restrict the service's egress for that (see the README).
        options["rtsp_transport"] = "tcp"
    guard = GuardedOpener(url, policy, httpx.Timeout(read_timeout, connect=open_timeout))
    container: av.container.InputContainer | None = None
    try:
        container = av.open(
            url, options=options, timeout=(open_timeout, read_timeout), io_open=guard
        )
        return PyAVCapture(container, guard)
    except _UNSUPPORTED as exc:
        reason = str(exc)
    except (av.FFmpegError, OSError, UnsafeURL) as exc:
        log.info("source could not be opened: %s", exc)
        if container is not None:
            container.close()
        guard.close()
        return ClosedCapture(guard.refusal)
    if container is not None:
        container.close()
    guard.close()
    if guard.nested or urlsplit(url).scheme.lower() not in ("", "file"):
        return ClosedCapture(guard.refusal)
    capture = cv2.VideoCapture(
        url,
        cv2.CAP_FFMPEG,
        [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
            int(open_timeout * 1000),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC,
            int(read_timeout * 1000),
        ],
    )
    if not capture.isOpened():
        capture.release()
        return ClosedCapture()
    log.info("PyAV could not decode the source (%s): OpenCV does", reason)
    return OpenCVCapture(capture)


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
    policy: URLPolicy = NO_EXCEPTIONS,
) -> FileSummary:
    """Analyse every frame of a clip due by ``params.analysis_fps``; raises
    :class:`VideoUnreadable` when it is not a video, or decoding stops early. A clip that
    names other resources (a playlist) has them opened under ``policy``."""
    observer = observer or FrameObserver()
    cancelled = cancelled or threading.Event()
    capture = open_capture(str(path), policy=policy)
    if capture.refusal is not None:
        raise VideoUnreadable(capture.refusal)
    if not capture.isOpened():
        raise VideoUnreadable(
            "not a readable video: no container or codec that FFmpeg can open was found "
            "(corrupt, truncated before its index, or not a video)"
        )
    decode_reduced(capture, params)
    fps = capture.fps
    declared = capture.frames_declared
    # ``queue_size`` frames at most wait, in batches.
    frames: queue.Queue[Any] = queue.Queue(maxsize=max(1, queue_size // FRAME_BATCH))
    gate = RateGate(params.analysis_fps)
    counts = {"decoded": 0}
    failure: list[BaseException] = []
    leaving = threading.Event()  # the analysis thread stopped: the reader stops too
    analyzer: Analyzer | None = None  # made by the reader, from the first frame's size

    def read() -> None:
        nonlocal analyzer
        batch: list[tuple[int, float, Picture, Prepared]] = []
        try:
            index = 0
            while not (cancelled.is_set() or leaving.is_set()) and capture.grab():
                counts["decoded"] += 1
                observer.decoded()
                t = index / fps
                if gate.due(t):
                    picture = capture.retrieve()
                    if picture is not None:
                        if analyzer is None:
                            analyzer = Analyzer(
                                params,
                                frame_size=picture.size,
                                fps=fps,
                                sink=sink,
                                clip_dir=clip_dir,
                            )
                        # Every frame queued is analysed: the reader prepares it (downscale,
                        # clip frame), which takes that work off the busier analysis thread.
                        batch.append((index, t, picture, analyzer.prepare(t, picture)))
                        if len(batch) == FRAME_BATCH:
                            frames.put(batch)
                            batch = []
                else:
                    observer.skipped()
                index += 1
        except BaseException as exc:  # handed to the analysis thread
            failure.append(exc)
        finally:
            capture.release()
            if batch:
                frames.put(batch)
            frames.put(_END)

    reader = threading.Thread(target=read, name=f"decode:{path.name}", daemon=True)
    analysed = 0
    reader.start()
    try:
        last_report = 0.0
        while True:
            item = frames.get()
            if item is _END:
                break
            assert analyzer is not None  # made before the first frame was queued
            for index, t, picture, prepared in item:
                analyzer.process(index, t, picture, prepared)
            analysed += len(item)
            observer.analysed(len(item))
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
        if analyzer is not None:  # stopped early (cancelled, an error): its thread ends too
            analyzer.output.stop()
    if cancelled.is_set():
        raise Cancelled("stopped before the end of the clip")
    if capture.refusal is not None:
        raise VideoUnreadable(capture.refusal)
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
    width, height = analyzer.frame_size
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
        opener: Callable[[str], Capture] = open_capture,
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
        self.latest: Picture | None = None  # for snapshots
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
                        reason = f"could not open the stream after {failures} attempts"
                        if capture.refusal is not None:
                            reason += f" ({capture.refusal})"
                        self._set_status("failed", reason)
                        return
                    self._set_status(
                        "reconnecting", capture.refusal or "the stream could not be opened"
                    )
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
                self._set_status(
                    "reconnecting",
                    capture.refusal or "the stream ended or stopped sending frames",
                )
                self._stop.wait(self.backoff.delay(failures))
        except Exception as exc:
            log.exception("stream worker crashed", extra={"stream": self.name})
            self._set_status("failed", f"internal error: {exc!r}")
            return
        finally:
            if self._analyzer is not None:
                self._analyzer.flush()
        self._set_status("stopped", None)

    def _consume(self, capture: Capture) -> int:
        """Read the stream until it ends; returns how many frames arrived."""
        decode_reduced(capture, self.params)
        fps = capture.fps
        mailbox: list[tuple[int, float, float, Picture] | None] = [None]
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
                    picture = capture.retrieve()
                    if picture is None:
                        continue
                    self.latest = picture
                    if self._paused.is_set():  # keep the snapshot fresh, analyse nothing
                        self.stats.skipped += 1
                        self.observer.skipped()
                        continue
                    with ready:
                        if mailbox[0] is not None:  # analysis is behind: skip, do not queue
                            self.stats.skipped += 1
                            self.stats.dropped_late += 1
                            self.observer.skipped()
                            self.observer.dropped_late()
                        mailbox[0] = (self.stats.decoded, t, arrived, picture)
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
                index, t, arrived, picture = item
                if self._analyzer is None:
                    width, height = picture.size
                    self._analyzer = Analyzer(
                        self.params,
                        frame_size=(width, height),
                        fps=fps,
                        sink=self.sink,
                        clip_dir=self.clip_dir,
                        counters=self.counters,
                    )
                self._analyzer.process(index, t, picture)
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
