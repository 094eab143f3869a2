"""Prometheus metrics of the video service. The ``source`` label is a stream id (bounded by
``max_streams``) or ``jobs`` for every uploaded clip together."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from c4c.shared.metrics import labelled
from c4c.video.analysis.sources import FrameObserver

FRAMES_DECODED = Counter("c4c_video_frames_decoded", "Frames decoded.", ["source"])
FRAMES_ANALYSED = Counter("c4c_video_frames_analysed", "Frames analysed.", ["source"])
FRAMES_SKIPPED = Counter(
    "c4c_video_frames_skipped",
    "Frames decoded but not analysed (analysis rate target or backpressure).",
    ["source"],
)
ANALYSIS_FPS = Gauge("c4c_video_analysis_fps", "Frames analysed per second, recently.", ["source"])
LAG = Gauge("c4c_video_lag_seconds", "How far analysis is behind the live stream.", ["source"])
RECONNECTS = Counter("c4c_video_reconnects", "Times a stream was reconnected.", ["source"])
DETECTIONS = Counter("c4c_video_detections", "Detections (events) stored.", ["source"])
JOBS = Counter("c4c_video_jobs_finished", "Clip jobs finished, by status.", ["status"])


class PrometheusObserver(FrameObserver):
    def __init__(self, source: str) -> None:
        self._decoded = labelled(FRAMES_DECODED, source)
        self._analysed = labelled(FRAMES_ANALYSED, source)
        self._skipped = labelled(FRAMES_SKIPPED, source)
        self._reconnects = labelled(RECONNECTS, source)
        self._lag = labelled(LAG, source)
        self._fps = labelled(ANALYSIS_FPS, source)

    def decoded(self, n: int = 1) -> None:
        self._decoded.inc(n)

    def analysed(self, n: int = 1) -> None:
        self._analysed.inc(n)

    def skipped(self, n: int = 1) -> None:
        self._skipped.inc(n)

    def reconnected(self) -> None:
        self._reconnects.inc()

    def lag(self, seconds: float) -> None:
        self._lag.set(seconds)

    def fps(self, value: float) -> None:
        self._fps.set(value)
