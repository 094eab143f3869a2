"""Prometheus metrics of the video service. The ``stream`` label is a stream id (bounded by
``max_streams``) or ``jobs`` for every uploaded clip together."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from c4c.shared.metrics import labelled
from c4c.video.analysis.sources import FrameObserver

FRAMES_DECODED = Counter("c4c_video_frames_decoded", "Frames decoded.", ["stream"])
FRAMES_ANALYSED = Counter("c4c_video_frames_analysed", "Frames analysed.", ["stream"])
FRAMES_SKIPPED = Counter(
    "c4c_video_frames_skipped",
    "Frames decoded but not analysed (analysis rate target or backpressure).",
    ["stream"],
)
FRAMES_DROPPED_LATE = Counter(
    "c4c_video_frames_dropped_late",
    "Of the skipped frames, those due for analysis but dropped because it was behind real "
    "time (backpressure): a stream that keeps dropping needs more CPU or a lower rate.",
    ["stream"],
)
ANALYSIS_FPS = Gauge("c4c_video_analysis_fps", "Frames analysed per second, recently.", ["stream"])
LAG = Gauge("c4c_video_lag_seconds", "How far analysis is behind the live stream.", ["stream"])
RECONNECTS = Counter("c4c_video_reconnects", "Times a stream was reconnected.", ["stream"])
STREAM_STATUS = Gauge(
    "c4c_video_stream_status",
    "1 for a live stream's current status (running, reconnecting, paused, failed, stopped), "
    "0 for the others.",
    ["stream", "status"],
)
DETECTIONS = Counter("c4c_video_detections", "Detections (events) stored.", ["stream"])
JOBS = Counter("c4c_video_jobs_finished", "Clip jobs finished, by status.", ["status"])

STATUSES = ("running", "reconnecting", "paused", "failed", "stopped")


class PrometheusObserver(FrameObserver):
    def __init__(self, stream: str) -> None:
        self._decoded = labelled(FRAMES_DECODED, stream)
        self._analysed = labelled(FRAMES_ANALYSED, stream)
        self._skipped = labelled(FRAMES_SKIPPED, stream)
        self._dropped_late = labelled(FRAMES_DROPPED_LATE, stream)
        self._reconnects = labelled(RECONNECTS, stream)
        self._lag = labelled(LAG, stream)
        self._fps = labelled(ANALYSIS_FPS, stream)
        self._stream = stream

    def decoded(self, n: int = 1) -> None:
        self._decoded.inc(n)

    def analysed(self, n: int = 1) -> None:
        self._analysed.inc(n)

    def skipped(self, n: int = 1) -> None:
        self._skipped.inc(n)

    def dropped_late(self, n: int = 1) -> None:
        self._dropped_late.inc(n)

    def reconnected(self) -> None:
        self._reconnects.inc()

    def lag(self, seconds: float) -> None:
        self._lag.set(seconds)

    def fps(self, value: float) -> None:
        self._fps.set(value)

    def status(self, status: str) -> None:
        # Looked up here, not up front: only live streams report a status, not "jobs".
        for name in STATUSES:
            STREAM_STATUS.labels(self._stream, name).set(1 if name == status else 0)
