"""A decoded frame, converted only as far as each use needs.

Colour conversion is the costliest step after decoding (full-size BGR of a 720p frame costs
about twice its decode), and the analysis does not need it: background subtraction runs on
the luma plane, which a YUV decoder hands over for free. Colour is made small for event
clips, and full size only for the keyframe an event finally keeps.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

import av
import cv2
import numpy as np
from av.video.reformatter import VideoReformatter
from numpy.typing import NDArray

Frame = NDArray[Any]  # uint8 pixels: BGR (height, width, 3) or grey (height, width)

# Pixel formats whose first plane is 8-bit luma (the ``j`` ones are full range).
LUMA_FIRST = frozenset(
    {
        "gray",
        "nv12",
        "nv21",
        "yuv410p",
        "yuv411p",
        "yuv420p",
        "yuv422p",
        "yuv440p",
        "yuv444p",
        "yuvj420p",
        "yuvj422p",
        "yuvj440p",
        "yuvj444p",
    }
)
# swscale's fast bilinear: as sharp as OpenCV's INTER_LINEAR for small previews, and a
# third of the default (filtered) bilinear's cost on a 720p frame.
SMALL_INTERPOLATION = "FAST_BILINEAR"


_reformatters = threading.local()


def _reformatter(form: str, size: tuple[int, int] | None = None) -> VideoReformatter:
    """This thread's converter to pixel format ``form`` at ``size``. A fresh frame's own
    converter sets swscale up anew at every call, which costs three times the conversion of
    an SD frame; a kept one reuses its context while the source's size and format stay."""
    kept: dict[tuple[str, tuple[int, int] | None], VideoReformatter] | None = getattr(
        _reformatters, "kept", None
    )
    if kept is None:
        kept = _reformatters.kept = {}
    reformatter = kept.get((form, size))
    if reformatter is None:
        reformatter = kept[form, size] = VideoReformatter()
    return reformatter


class Picture(Protocol):
    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        ...

    def grey(self) -> Frame:
        """Full-size 8-bit brightness."""
        ...

    def colour(self, size: tuple[int, int] | None = None) -> Frame:
        """BGR pixels, full size or resized to ``size`` (width, height)."""
        ...


class DecodedPicture:
    """A PyAV frame: the luma plane is read in place, colour is converted on demand."""

    __slots__ = ("frame",)

    def __init__(self, frame: av.VideoFrame) -> None:
        self.frame = frame

    @property
    def size(self) -> tuple[int, int]:
        return self.frame.width, self.frame.height

    def grey(self) -> Frame:
        frame = self.frame
        if frame.format.name not in LUMA_FIRST:
            grey: Frame = _reformatter("gray").reformat(frame, format="gray").to_ndarray()
            return grey
        plane = frame.planes[0]
        # Rows are padded to ``line_size``; the view skips the padding without a copy.
        rows: Frame = np.frombuffer(memoryview(plane), np.uint8)
        return rows.reshape(plane.height, plane.line_size)[:, : plane.width]

    def colour(self, size: tuple[int, int] | None = None) -> Frame:
        if size is None or size == self.size:
            full: Frame = _reformatter("bgr24").reformat(self.frame, format="bgr24").to_ndarray()
            return full
        width, height = size
        small = _reformatter("bgr24", size).reformat(
            self.frame, width, height, "bgr24", interpolation=SMALL_INTERPOLATION
        )
        pixels: Frame = small.to_ndarray()
        return pixels


class ArrayPicture:
    """BGR pixels already in hand (OpenCV decoding, tests)."""

    __slots__ = ("_grey", "pixels")

    def __init__(self, pixels: Frame) -> None:
        self.pixels = pixels
        self._grey: Frame | None = None

    @property
    def size(self) -> tuple[int, int]:
        height, width = self.pixels.shape[:2]
        return width, height

    def grey(self) -> Frame:
        if self._grey is None:
            pixels = self.pixels
            self._grey = cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY) if pixels.ndim == 3 else pixels
        return self._grey

    def colour(self, size: tuple[int, int] | None = None) -> Frame:
        pixels = self.pixels
        if pixels.ndim == 2:
            pixels = cv2.cvtColor(pixels, cv2.COLOR_GRAY2BGR)
        if size is None or size == self.size:
            return pixels
        resized: Frame = cv2.resize(pixels, size, interpolation=cv2.INTER_LINEAR)
        return resized
