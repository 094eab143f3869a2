"""Requests and answers of the video API."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from c4c.shared.db import Utc
from c4c.shared.text import Storable

Coordinate = float
ShapeName = Annotated[Storable, Field(min_length=1, max_length=100)]
StreamName = Annotated[Storable, Field(min_length=1, max_length=200)]
Url = Annotated[Storable, Field(min_length=1, max_length=2000)]


class Line(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: ShapeName
    points: list[tuple[Coordinate, Coordinate]] = Field(
        min_length=2, max_length=2, description="Two points, as fractions (0..1) of the frame."
    )

    @field_validator("points")
    @classmethod
    def _in_frame(cls, points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        return _in_unit_square(points)


class Zone(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: ShapeName
    polygon: list[tuple[Coordinate, Coordinate]] = Field(
        min_length=3, max_length=64, description="Vertices, as fractions (0..1) of the frame."
    )

    @field_validator("polygon")
    @classmethod
    def _in_frame(cls, points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        return _in_unit_square(points)


def _in_unit_square(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    for x, y in points:
        if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
            raise ValueError("coordinates are fractions of the frame, between 0 and 1")
    return points


class StreamIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StreamName
    url: Url
    lines: list[Line] = Field(default_factory=list, max_length=16)
    zones: list[Zone] = Field(default_factory=list, max_length=16)
    start: bool = Field(True, description="Start processing at once.")


class StreamPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StreamName | None = None
    url: Url | None = None
    lines: list[Line] | None = Field(None, max_length=16)
    zones: list[Zone] | None = Field(None, max_length=16)


class StreamStatus(BaseModel):
    status: str = Field(description="starting, running, paused, reconnecting, failed, stopped")
    desired: Literal["running", "paused", "stopped"]
    reason: str | None
    stats: dict[str, Any]
    counts: dict[str, Any]
    updated_at: Utc


class StreamOut(StreamStatus):
    id: str
    name: str
    url: str
    lines: list[Line]
    zones: list[Zone]
    created_at: Utc


class JobOut(BaseModel):
    id: str
    filename: str | None
    size_bytes: int
    status: Literal["queued", "running", "succeeded", "failed"]
    reason: str | None
    progress: float
    frames_declared: int | None
    frames_decoded: int
    frames_analysed: int
    duration_seconds: float | None
    detections: int
    classification: Literal["empty", "events"] | None
    attempts: int
    created_at: Utc
    started_at: Utc | None
    finished_at: Utc | None


class BoxOut(BaseModel):
    t: float = Field(description="Seconds from the start of the source.")
    frame: int
    x: float
    y: float
    w: float
    h: float


class DetectionOut(BaseModel):
    id: str
    stream_id: str | None
    job_id: str | None
    track_id: int
    start_seconds: float
    end_seconds: float
    started_at: Utc | None
    ended_at: Utc | None
    keyframe_seconds: float
    keyframe_box: list[float]
    frame_width: int
    frame_height: int
    boxes: list[BoxOut]
    keyframe_url: str
    clip_url: str | None
    created_at: Utc


class Page(BaseModel):
    limit: int
    offset: int


class StreamList(Page):
    items: list[StreamOut]


class JobList(Page):
    items: list[JobOut]


class DetectionList(Page):
    items: list[DetectionOut]
