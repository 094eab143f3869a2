"""A decoded frame, converted only as far as each use needs.

Colour conversion is the costliest step after decoding (full-size BGR of a 720p frame costs
about twice its decode), and the analysis does not need it: background subtraction runs on
the luma plane, which a YUV decoder hands over for free. Event clips get small YUV 4:2:0
frames, the encoder's own format, resized plane by plane (no colour conversion at all; at the
analysis size their luma is the analysis' own downscaled plane, so only chroma is resized);
full size BGR is made only for the keyframe an event finally keeps.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

import av
import cv2
import numpy as np
from av.video.codeccontext import VideoCodecContext
from av.video.reformatter import VideoReformatter
from av.video.stream import VideoStream
from numpy.typing import NDArray

Frame = NDArray[Any]  # uint8 pixels: BGR (height, width, 3) or grey (height, width)

# Three 8-bit planes, Y then U then V, chroma subsampled or not: resized plane by plane into
# a clip frame. The ``j`` ones are full range and get squeezed to the limited range of the rest.
PLANAR_YUV = frozenset(
    {
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
# Pixel formats whose first plane is 8-bit luma (the ``j`` ones are full range).
LUMA_FIRST = PLANAR_YUV | {"gray", "nv12", "nv21"}
_levels = np.arange(256, dtype=np.float64)
# Full range (0-255) to video range: luma 16-235, chroma 16-240 around 128 (ITU-R BT.601).
_LUMA_TO_VIDEO = np.round(16 + _levels * 219 / 255).astype(np.uint8)
_CHROMA_TO_VIDEO = np.round(128 + (_levels - 128) * 224 / 255).astype(np.uint8)
_TO_VIDEO_RANGE = (_LUMA_TO_VIDEO, _CHROMA_TO_VIDEO, _CHROMA_TO_VIDEO)
# swscale's fast bilinear, for formats without a plane-by-plane path: as sharp as OpenCV's
# INTER_LINEAR for small frames, a third of the default (filtered) bilinear's cost at 720p.
SMALL_INTERPOLATION = "FAST_BILINEAR"
# swscale converts on the calling thread alone: the pipeline's own threads keep both cores
# busy, and its helper threads (by default one per core) only added CPU time and wake-ups
# (a 768x576 keyframe to BGR: 0.17 ms of CPU on the calling thread, 0.20 with helpers).
SWSCALE_THREADS = 1


_reformatters = threading.local()


def _pixels(plane: av.video.plane.VideoPlane) -> Frame:
    """The plane's pixels in place (writable): rows are padded to ``line_size``, the view
    skips the padding without a copy."""
    rows: Frame = np.frombuffer(memoryview(plane), np.uint8)
    return rows.reshape(plane.height, plane.line_size)[:, : plane.width]


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
        """8-bit brightness: full size, or smaller when the decoder reduced the frame (see
        :class:`ReducedPicture`); never smaller than the analysis size."""
        ...

    def colour(self) -> Frame:
        """Full-size BGR pixels."""
        ...

    def clip_frame(self, size: tuple[int, int], luma: Frame | None = None) -> av.VideoFrame:
        """Resized to ``size`` (width, height; even) as video-range YUV 4:2:0, what an H.264
        encoder takes. ``luma``, when given, is :meth:`grey` already resized to ``size``
        (the analysis frame): a picture that can reuses it rather than resizing again."""
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
            grey: Frame = (
                _reformatter("gray")
                .reformat(frame, format="gray", threads=SWSCALE_THREADS)
                .to_ndarray()
            )
            return grey
        return _pixels(frame.planes[0])

    def colour(self) -> Frame:
        full: Frame = (
            _reformatter("bgr24")
            .reformat(self.frame, format="bgr24", threads=SWSCALE_THREADS)
            .to_ndarray()
        )
        return full

    def clip_frame(self, size: tuple[int, int], luma: Frame | None = None) -> av.VideoFrame:
        frame = self.frame
        form = frame.format.name
        width, height = size
        if form not in PLANAR_YUV:
            converted: av.VideoFrame = _reformatter("yuv420p", size).reformat(
                frame,
                width,
                height,
                "yuv420p",
                interpolation=SMALL_INTERPOLATION,
                threads=SWSCALE_THREADS,
            )
            return converted
        # OpenCV's resize of the three planes, straight into the new frame's, costs a third
        # to a half of swscale's scaled conversion to 4:2:0 (no fast path for these sizes).
        small = av.VideoFrame(width, height, "yuv420p")
        planes = zip(frame.planes, small.planes, _TO_VIDEO_RANGE, strict=True)
        for plane, (source, target, lut) in enumerate(planes):
            pixels = _pixels(target)
            if plane == 0 and luma is not None and luma.shape == pixels.shape:
                pixels[:] = luma  # a source that changed size mid-stream is resized instead
            else:
                cv2.resize(
                    _pixels(source), pixels.shape[::-1], dst=pixels, interpolation=cv2.INTER_LINEAR
                )
            if form.startswith("yuvj"):
                cv2.LUT(pixels, lut, dst=pixels)
        return small


class ReducedPicture(DecodedPicture):
    """A frame of an intra-only source decoded at a fraction of its size (FFmpeg's
    ``lowres``: the JPEG decoder scales the DCT, a third cheaper than a full decode, and no
    resize from full size follows). Brightness and clip frames come from the small frame;
    colour, wanted for a keyframe or a snapshot only, is decoded again at full size from the
    frame's own packet, which needs no other frame."""

    __slots__ = ("codec", "full_size", "packet")

    def __init__(
        self,
        frame: av.VideoFrame,
        packet: av.Packet[VideoStream],
        codec: str,
        full_size: tuple[int, int],
    ) -> None:
        super().__init__(frame)
        self.packet, self.codec, self.full_size = packet, codec, full_size

    @property
    def size(self) -> tuple[int, int]:
        return self.full_size

    def colour(self) -> Frame:
        # A decoder of its own: the source's is reducing, and on another thread.
        decoder = av.CodecContext.create(self.codec, "r")
        assert isinstance(decoder, VideoCodecContext)  # a video source's codec
        frames = decoder.decode(self.packet) + decoder.decode(None)
        if not frames:  # pragma: no cover - the packet decoded once already
            raise RuntimeError("the frame's packet no longer decodes")
        return DecodedPicture(frames[0]).colour()


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

    def colour(self) -> Frame:
        pixels = self.pixels
        if pixels.ndim == 2:
            pixels = cv2.cvtColor(pixels, cv2.COLOR_GRAY2BGR)
        return pixels

    def clip_frame(self, size: tuple[int, int], luma: Frame | None = None) -> av.VideoFrame:
        # OpenCV's grey is full-range luma where the clip needs video range: no reuse.
        resized = cv2.resize(self.colour(), size, interpolation=cv2.INTER_LINEAR)
        i420: Frame = cv2.cvtColor(resized, cv2.COLOR_BGR2YUV_I420)
        return av.VideoFrame.from_ndarray(i420, format="yuv420p")
