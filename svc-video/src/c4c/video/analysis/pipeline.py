"""The per-frame analysis: downscale the luma plane → background subtraction → morphology →
blobs → tracking → events with a keyframe and a short clip. Synchronous and CPU-bound: it runs in a
worker thread (OpenCV releases the GIL in its heavy calls), never on the event loop."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import sys
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from functools import partial
from pathlib import Path
from typing import Final, Literal

import av
import cv2

from c4c.video.analysis.counting import Counters
from c4c.video.analysis.events import Event, EventBuilder, EventParams, keyframe_score
from c4c.video.analysis.pictures import Frame, Picture
from c4c.video.analysis.tracking import Box, Observation, Track, Tracker, TrackerParams

log = logging.getLogger("c4c.video.pipeline")

# H.264 in MP4, what every browser plays (OpenCV's writer has mp4v only, which they do not),
# by the libx264 that PyAV's wheels bundle. ``ultrafast`` spends its time writing bits, so
# CRF 28 (smaller evidence clips, still clear at 320 px) costs 0.3 ms a 320x240 frame where
# the default 23 costs 0.4, and 0.13 ms at 192x144 (``tune zerolatency`` saves nothing
# measurable: ultrafast has no lookahead or B-frames already).
# One thread: the analysis has the other core. The index goes first (``faststart``) so that
# a browser plays a clip while it downloads.
CLIP_CODEC: Final = "libx264"
CLIP_OPTIONS = {"preset": "ultrafast", "crf": "28"}
CLIP_SUFFIX = ".mp4"
CLIP_CONTENT_TYPE = "video/mp4"
# Evidence can wait, analysis cannot (a live stream behind real time drops frames): the output
# thread runs this much nicer (Linux), in the gaps the decode and analysis threads leave on a
# busy machine; its bounded queue holds the analysis back before it falls far behind.
OUTPUT_NICENESS = 10


@dataclass(frozen=True, slots=True)
class AnalysisParams:
    analysis_fps: float = 10.0  # frames analysed per second of video; 0 = every frame
    analysis_width: int = 0  # frames are downscaled to this width; 0 = by frame size
    subtractor: Literal["mog2", "knn"] = "mog2"
    learning_rate: float = -1.0  # background model; -1 = OpenCV's automatic rate
    history: int = 200
    # MOG2: squared Mahalanobis distance; KNN: squared distance. On luma a change counts in
    # one channel, not three as in BGR: 16 keeps the walkers of vtest.avi that BGR's 25 found
    # (31 of 40 vs 32) and finds fewer false events in camera motion (cityCC0: 5 vs 27).
    var_threshold: float = 16.0
    detect_shadows: bool = False
    warmup_frames: int = 10  # analysed frames the background model learns before detecting
    min_area: float = 0.001  # a blob smaller than this fraction of the frame is noise
    max_foreground: float = 0.4  # more foreground than this: camera moved or light changed
    open_kernel: int = 3
    close_kernel: int = 5  # merges the parts of one body
    tracker: TrackerParams = field(default_factory=TrackerParams)
    events: EventParams = field(default_factory=EventParams)
    # Clips are small frames, resized straight from the decoder's YUV; 0 = the analysis size,
    # whose luma the analysis has already made (encoding 192x144 costs 0.4 of 320x240's).
    clip_width: int = 0
    clip_fps: float = 10.0  # at most this many frames a second go into clips; 0 = all analysed
    clip_preroll: float = 1.0
    clip_postroll: float = 1.0
    clip_max_seconds: float = 15.0
    jpeg_quality: int = 90
    output_niceness: int = OUTPUT_NICENESS


@dataclass(frozen=True, slots=True)
class DetectedEvent:
    """An event ready to be stored: times are seconds from the source's start."""

    track_id: int
    start: float
    end: float
    start_frame: int
    end_frame: int
    boxes: list[Observation]
    keyframe_box: Box
    keyframe_time: float
    keyframe_jpeg: bytes
    clip_path: Path | None  # the finished clip (in ``clip_dir``), shared by overlapping events
    frame_size: tuple[int, int]


EventSink = Callable[[DetectedEvent], None]


@dataclass(frozen=True, slots=True)
class Prepared:
    """The part of a frame's analysis that depends on the frame alone, so that another thread
    can do it ahead (see :meth:`Analyzer.prepare`)."""

    small: Frame  # the luma, downscaled to the analysis size
    clip_frame: av.VideoFrame | None  # the frame as it goes into clips, when it is due there


class RateGate:
    """Says which frames to take so that ``rate`` frames per second of video are."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.next_t = -math.inf

    def due(self, t: float) -> bool:
        if t + 1e-6 < self.next_t:
            return False
        # On schedule: no drift. After a gap: restart from this frame, not a burst.
        on_time = math.isfinite(self.next_t) and t - self.next_t < self.interval
        self.next_t = (self.next_t if on_time else t) + self.interval
        return True


# Automatic analysis width: background subtraction costs in proportion to the pixels it sees
# and decoding in proportion to the source's, so analysing a fifth of the source width keeps
# the two in step. Bounds: from 160 px, SD scenes keep their tracks (vtest.avi: 29 of 40
# people at 160 and 192 px, the same within 1 at each hand-counted instant, 31 at 240 and
# 320) while the background model costs half of 240 px's; above 320 px costs more and finds
# nothing more on these scenes. A fifth rather than a quarter: vtest.avi analysed at 160 px,
# not 192, costs 1.5 ms of CPU a frame instead of 1.75 (every stage after decoding is
# smaller), the camera motion of cityCC0.mpg makes 1 false event instead of 2, and the one
# cockatoo of cockatoo.mp4 (256 px, not 320) 23 track fragments instead of 35.
AUTO_WIDTH_FRACTION = 5
AUTO_WIDTH_MIN = 160
AUTO_WIDTH_MAX = 320


def even(length: float) -> int:
    """``length`` rounded, then down to even, at least 2 (4:2:0 frames have even sides)."""
    return max(2, round(length) // 2 * 2)


def analysis_width(params: AnalysisParams, width: int) -> int:
    if params.analysis_width:
        return params.analysis_width
    return min(max(width // AUTO_WIDTH_FRACTION, AUTO_WIDTH_MIN), AUTO_WIDTH_MAX)


class ForegroundDetector:
    """Moving blobs of one frame, as boxes in source pixels."""

    def __init__(self, params: AnalysisParams, frame_size: tuple[int, int]) -> None:
        self.params = params
        width, height = frame_size
        self.scale = min(1.0, analysis_width(params, width) / width) if width else 1.0
        # Even sides when downscaling, so that the analysis frame is a clip frame's luma.
        self.size = (
            (even(width * self.scale), even(height * self.scale))
            if self.scale < 1.0
            else (width, height)
        )
        if params.subtractor == "knn":
            self.model: cv2.BackgroundSubtractor = cv2.createBackgroundSubtractorKNN(
                history=params.history,
                dist2Threshold=params.var_threshold * 16,
                detectShadows=params.detect_shadows,
            )
        else:
            self.model = cv2.createBackgroundSubtractorMOG2(
                history=params.history,
                varThreshold=params.var_threshold,
                detectShadows=params.detect_shadows,
            )
        self.open = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (params.open_kernel,) * 2)
        self.close = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (params.close_kernel,) * 2)
        self.min_pixels = params.min_area * self.size[0] * self.size[1]
        # 16-bit labels halve the labelling's memory traffic; an image has at most one
        # 8-connected component per 2x2 pixels, so they suffice below this size.
        self.label_type = cv2.CV_16U if self.size[0] * self.size[1] < 4 * 65535 else cv2.CV_32S
        self.frames = 0

    def downscale(self, grey: Frame) -> Frame:
        if self.scale >= 1.0 or grey.shape == self.size[::-1]:  # decoded at this size already
            return grey
        resized: Frame = cv2.resize(grey, self.size, interpolation=cv2.INTER_LINEAR)
        return resized

    def detect(self, small: Frame) -> list[Box]:
        mask = self.model.apply(small, learningRate=self.params.learning_rate)
        self.frames += 1
        if self.frames <= self.params.warmup_frames:
            return []
        if self.params.detect_shadows:  # shadows are 127, foreground 255
            _, mask = cv2.threshold(mask, 200, 255, cv2.THRESH_BINARY)
        if cv2.countNonZero(mask) > self.params.max_foreground * mask.size:
            return []
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, self.open)
        if not cv2.countNonZero(mask):  # the usual case of a quiet scene: skip labelling
            return []
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, self.close)
        count, _, stats, _ = cv2.connectedComponentsWithStats(
            mask, connectivity=8, ltype=self.label_type
        )
        inverse = 1.0 / self.scale
        return [
            Box(float(x) * inverse, float(y) * inverse, float(w) * inverse, float(h) * inverse)
            for x, y, w, h, area in stats[1:count].tolist()
            if area >= self.min_pixels
        ]


def sharpness(small: Frame, box: Box, scale: float) -> float:
    """Variance of the Laplacian inside the box of a grey frame: high when edges are crisp."""
    x0, y0 = max(0, int(box.x * scale)), max(0, int(box.y * scale))
    x1, y1 = int((box.x + box.w) * scale) + 1, int((box.y + box.h) * scale) + 1
    roi = small[y0:y1, x0:x1]
    if roi.size == 0:
        return 0.0
    # OpenCV's meanStdDev is a third of numpy's var() on these small arrays.
    _, deviation = cv2.meanStdDev(cv2.Laplacian(roi, cv2.CV_32F))
    return float(deviation[0, 0]) ** 2


class OutputThread:
    """Runs the analysis' output in order on a thread of its own: clip encoding (as costly per
    frame as the background model), keyframe JPEGs and the sink, which may wait on a
    database. The analysis thread only queues them, so on two cores they overlap with it.
    PyAV and OpenCV release the GIL while they encode.

    Tasks go to the thread ``batch`` at a time, fewer wake-ups than one per clip frame (the
    thread's CPU time on vtest.avi: 0.29 ms a frame, not 0.31), or at once by :meth:`send`:
    an event must not wait for frames that a quiet or paused stream may not send.

    A failed task stops the work: the error is raised by the next ``submit`` or ``join``."""

    def __init__(self, name: str, depth: int = 64, batch: int = 8, niceness: int = 0) -> None:
        self.name = name
        self.batch = batch
        self.niceness = niceness
        # At most ``depth`` queued tasks: a slow encoder or sink holds the analysis back.
        self.tasks: queue.Queue[list[Callable[[], object]] | None] = queue.Queue(
            max(1, depth // batch)
        )
        self.pending: list[Callable[[], object]] = []
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def submit(self, task: Callable[[], object]) -> None:
        self._raise()
        self.pending.append(task)
        if len(self.pending) >= self.batch:
            self.send()

    def send(self) -> None:
        """Hand the tasks submitted so far to the thread now."""
        if not self.pending:
            return
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self.thread.start()
        tasks, self.pending = self.pending, []
        self.tasks.put(tasks)

    def join(self) -> None:
        """Wait until every task ran, then raise what failed, if anything."""
        self.stop()
        self._raise()

    def stop(self) -> None:
        """Run what is queued and end the thread (the next ``submit`` starts another)."""
        self.send()
        if self.thread is not None:
            self.tasks.put(None)
            self.thread.join()
            self.thread = None

    def _raise(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def _run(self) -> None:
        if self.niceness:
            _lower_priority(self.niceness)
        while (tasks := self.tasks.get()) is not None:
            for task in tasks:
                if self.error is None:  # after a failure the rest is skipped, not run
                    try:
                        task()
                    except BaseException as exc:
                        self.error = exc


def _lower_priority(niceness: int) -> None:
    """Raise the calling thread's niceness by ``niceness``. Linux alone gives each thread a
    nice value of its own (elsewhere the whole process would be slowed): a no-op there."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError):  # a sandbox may refuse it: run at normal priority
            thread = threading.get_native_id()
            os.setpriority(
                os.PRIO_PROCESS, thread, os.getpriority(os.PRIO_PROCESS, thread) + niceness
            )


class _Clip:
    """The encoder of one clip file; used on the output thread only."""

    def __init__(self, path: Path, fps: float, size: tuple[int, int]) -> None:
        self.output = av.open(str(path), "w", options={"movflags": "+faststart"})
        self.stream = self.output.add_stream(
            CLIP_CODEC, rate=Fraction(fps).limit_denominator(1001), options=CLIP_OPTIONS
        )
        self.stream.width, self.stream.height = size
        self.stream.pix_fmt = "yuv420p"
        self.stream.codec_context.thread_count = 1
        self.frames = 0

    def write(self, frame: av.VideoFrame) -> None:
        frame.pts = self.frames
        self.frames += 1
        self.output.mux(self.stream.encode(frame))

    def close(self) -> None:
        self.output.mux(self.stream.encode(None))
        self.output.close()


class _Segment:
    """One clip file recorded while something moves; every event inside it shares it. Its
    frames, those after ``after`` (the end of the previous segment), are encoded on the
    output thread, and so are its events, which wait in ``detections`` (touched by the
    output thread only) until the clip is complete."""

    def __init__(
        self,
        path: Path,
        fps: float,
        size: tuple[int, int],
        output: OutputThread,
        after: float = -math.inf,
    ) -> None:
        self.path = path
        self.output = output
        self.start = math.inf  # the time of its first frame
        self.last_t = after
        self.detections: list[DetectedEvent] = []
        self.clip: _Clip | None = None
        output.submit(partial(self._open, fps, size))

    def _open(self, fps: float, size: tuple[int, int]) -> None:
        self.clip = _Clip(self.path, fps, size)

    def write(self, t: float, frame: av.VideoFrame) -> None:
        if t > self.last_t:
            self.output.submit(partial(self._write, frame))
            self.start = min(self.start, t)
            self.last_t = t

    def _write(self, frame: av.VideoFrame) -> None:
        assert self.clip is not None
        self.clip.write(frame)

    def close(self) -> None:
        self.output.submit(self._close)

    def _close(self) -> None:
        assert self.clip is not None
        self.clip.close()


class Analyzer:
    """Feeds frames through the pipeline and hands each finished event to ``sink``.

    Clips: while a confirmed event is on screen one segment is recorded (pre-roll from a ring
    of recent frames, post-roll after the last event, at most ``clip_max_seconds``); events
    that overlap share it, so a busy scene encodes each frame once, not once per event. A
    segment's pre-roll stops where the previous segment ended: a scene busy for longer than
    ``clip_max_seconds`` gives back-to-back clips, not clips that encode the same seconds
    again. An event goes to the sink when its segment is complete."""

    def __init__(
        self,
        params: AnalysisParams,
        *,
        frame_size: tuple[int, int],
        fps: float,
        sink: EventSink,
        clip_dir: Path | None,
        counters: Counters | None = None,
    ) -> None:
        self.params = params
        self.frame_size = frame_size
        self.sink = sink
        self.clip_dir = clip_dir
        self.counters = counters or Counters()
        self.detector = ForegroundDetector(params, frame_size)
        self.tracker = Tracker(params.tracker)
        self.events: EventBuilder[Picture] = EventBuilder(params.events)
        rate = params.analysis_fps if params.analysis_fps > 0 else fps
        rate = min(rate, fps) if fps > 0 else rate
        self.clip_fps = max(1.0, min(rate, params.clip_fps) if params.clip_fps > 0 else rate)
        self.clip_gate = RateGate(self.clip_fps if self.clip_fps < rate else 0.0)
        width, height = frame_size
        if params.clip_width:
            scale = min(1.0, params.clip_width / width) if width else 1.0
            self.clip_size = (even(width * scale), even(height * scale))
        else:
            self.clip_size = (even(self.detector.size[0]), even(self.detector.size[1]))
        # The analysis frame is the clip frame's luma: it is not resized twice.
        self.clip_luma = self.clip_size == self.detector.size
        span = params.clip_preroll + params.events.min_seconds + 1.0
        self.recent: deque[tuple[float, av.VideoFrame]] = deque(
            maxlen=max(2, int(span * self.clip_fps))
        )
        self.segment: _Segment | None = None
        self.recorded_until = -math.inf  # the last frame of the last segment
        self.active_until = -math.inf  # the open segment records at least until then
        self.output = OutputThread("analysis-output", niceness=params.output_niceness)
        self.detections = 0

    def prepare(self, t: float, picture: Picture) -> Prepared:
        """Downscale the frame, and make its clip frame when it is due in clips. Called once
        for every frame :meth:`process` gets, in the same order, from one thread at a time;
        not necessarily ``process``'s thread (a file's reader runs it ahead)."""
        small = self.detector.downscale(picture.grey())
        clip_frame = None
        if self.clip_dir is not None and self.clip_gate.due(t):
            clip_frame = picture.clip_frame(self.clip_size, small if self.clip_luma else None)
        return Prepared(small, clip_frame)

    def process(
        self, index: int, t: float, picture: Picture, prepared: Prepared | None = None
    ) -> int:
        """Analyse one frame (``prepared`` by :meth:`prepare`, or here when not given);
        returns how many blobs it had."""
        if prepared is None:
            prepared = self.prepare(t, picture)
        small = prepared.small
        boxes = self.detector.detect(small)
        update = self.tracker.update(index, t, boxes)
        width, height = self.frame_size
        confirmed_from = math.inf
        for track in update.active:
            observation = track.last
            box = observation.box
            cx, cy = box.centre
            self.counters.observe(track.id, (cx / width, cy / height))
            if self.events.worth_scoring(track.id, box):
                score = keyframe_score(
                    box, sharpness(small, box, self.detector.scale), self.frame_size
                )
                self.events.offer(track.id, observation, score, picture)
            if self.events.is_event(track):
                confirmed_from = min(confirmed_from, track.first.t)
            long_event = self.events.cut_if_long(track)
            if long_event is not None:
                self._attach(long_event)
        ended = [e for e in map(self._end_track, update.ended) if e is not None]
        if confirmed_from < math.inf:
            self.active_until = t + self.params.clip_postroll
        if prepared.clip_frame is not None:
            self._record(t, prepared.clip_frame, confirmed_from)
        for event in ended:
            self._attach(event)
        return len(boxes)

    def flush(self) -> None:
        """The source ended or dropped: every open track ends and every event goes out
        (when this returns, the sink has had them all)."""
        for track in self.tracker.flush():
            event = self._end_track(track)
            if event is not None:
                self._attach(event)
        self._close_segment()
        self.output.join()

    def _end_track(self, track: Track) -> Event[Picture] | None:
        self.counters.forget(track.id)
        return self.events.end(track)

    def _record(self, t: float, clip_frame: av.VideoFrame, confirmed_from: float) -> None:
        self.recent.append((t, clip_frame))
        segment = self.segment
        if segment is not None and (
            t > self.active_until or t - segment.start >= self.params.clip_max_seconds
        ):
            self._close_segment()
            segment = None
        if segment is None and confirmed_from < math.inf:
            assert self.clip_dir is not None
            start = max(
                confirmed_from - self.params.clip_preroll, t - self.params.clip_max_seconds / 2
            )
            segment = _Segment(
                self.clip_dir / f"clip-{uuid.uuid4().hex}{CLIP_SUFFIX}",
                self.clip_fps,
                self.clip_size,
                self.output,
                after=self.recorded_until,
            )
            for past_t, past in self.recent:
                if past_t >= start:
                    segment.write(past_t, past)
            self.segment = segment
        elif segment is not None:
            segment.write(t, clip_frame)

    def _attach(self, event: Event[Picture]) -> None:
        """The event ended: its keyframe is encoded now, on the output thread, so that its
        full-size frame is let go and a busy segment's keyframes are not all left for its
        end (at the end of a clip, the other core would wait for them). It goes to the sink
        when its segment's clip is complete, or at once without a segment."""
        segment = self.segment
        if segment is not None:
            self.output.submit(partial(self._describe_into, segment, event))
        else:
            self.output.submit(partial(self._emit, event))
            self.output.send()

    def _close_segment(self) -> None:
        segment, self.segment = self.segment, None
        if segment is None:
            return
        self.recorded_until = segment.last_t
        segment.close()
        self.output.submit(partial(self._emit_segment, segment))
        self.output.send()  # a live stream may send no more frames for a while

    def _describe_into(self, segment: _Segment, event: Event[Picture]) -> None:
        segment.detections.append(self._describe(event, segment.path))

    def _emit_segment(self, segment: _Segment) -> None:
        for detection in segment.detections:
            self._sink(detection)

    def _emit(self, event: Event[Picture]) -> None:
        self._sink(self._describe(event, None))

    def _sink(self, detection: DetectedEvent) -> None:
        self.detections += 1
        self.sink(detection)

    def _describe(self, event: Event[Picture], clip_path: Path | None) -> DetectedEvent:
        ok, jpeg = cv2.imencode(
            ".jpg",
            event.keyframe.image.colour(),
            [cv2.IMWRITE_JPEG_QUALITY, self.params.jpeg_quality],
        )
        if not ok:  # pragma: no cover - OpenCV encodes any uint8 BGR frame
            raise RuntimeError("could not encode a keyframe")
        return DetectedEvent(
            track_id=event.track_id,
            start=event.start.t,
            end=event.end.t,
            start_frame=event.start.frame,
            end_frame=event.end.frame,
            boxes=event.observations,
            keyframe_box=event.keyframe.observation.box,
            keyframe_time=event.keyframe.observation.t,
            keyframe_jpeg=jpeg.tobytes(),
            clip_path=clip_path,
            frame_size=self.frame_size,
        )
