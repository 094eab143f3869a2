"""Image evidence with OpenCV, decoded once: size, sharpness (variance of the Laplacian at a
fixed working size, so photos of any size compare), clipped highlights and shadows, and a
64-bit perceptual hash (DCT of a 32x32 thumbnail) that survives re-encoding and resizing.

CPU-bound and blocking (OpenCV releases the GIL): run it in a worker thread."""

from __future__ import annotations

import io
import math
from collections.abc import Iterable

import cv2
import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError

from c4c.quality.rules.model import ImageFacts
from c4c.shared.media import exif_info

WORKING_SIDE = 512
"""Long side the sharpness is measured at: the same detail scale whatever the photo's size."""


_REDUCED_READS = (
    (8, cv2.IMREAD_REDUCED_GRAYSCALE_8),
    (4, cv2.IMREAD_REDUCED_GRAYSCALE_4),
    (2, cv2.IMREAD_REDUCED_GRAYSCALE_2),
)


def analyse(
    data: bytes, media_id: str | None, *, max_pixels: int, read_exif: bool = False
) -> ImageFacts:
    """The facts of one photo; with ``read_exif`` its EXIF capture time and GPS position too
    (for photos whose observation does not carry them).

    The bytes are decoded once, by OpenCV (which refuses truncated or corrupt data); Pillow
    only parses the header, for the declared size and the EXIF (``probe_image``'s own check
    decode, on top, cost as much as OpenCV's)."""
    try:
        # The declared size first, so a decompression bomb is never inflated.
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
            if width * height > max_pixels:
                return ImageFacts(
                    media_id, readable=False, error=f"{width}x{height} is too many pixels"
                )
            exif = exif_info(header, width, height) if read_exif else None
    except Image.DecompressionBombError:  # past twice Pillow's own limit: not even sized
        return ImageFacts(media_id, readable=False, error="too many pixels")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        return ImageFacts(media_id, readable=False, error=f"not a decodable image: {exc}"[:200])
    # JPEG decodes straight to 1/2, 1/4 or 1/8 scale (DCT scaling, several times faster than
    # a full decode): the largest reduction that still covers the working size.
    reduction, flag = next(
        ((r, f) for r, f in _REDUCED_READS if max(width, height) // r >= WORKING_SIDE),
        (1, cv2.IMREAD_GRAYSCALE),
    )
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag)
    if image is None:
        return ImageFacts(media_id, readable=False, error="truncated or corrupt image")
    if reduction == 1:
        height, width = image.shape
    scale = WORKING_SIDE / max(image.shape)
    # What is left is at most a halving (the reduced decode saw to that): bilinear suffices,
    # at a fifth of the cost of area averaging.
    working = (
        cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
        if scale < 1
        else image
    )
    # 16-bit integers hold the 8-bit Laplacian exactly (|value| <= 4 x 255), at 2/3 the cost.
    sharpness = laplacian_variance(cv2.Laplacian(working, cv2.CV_16S))
    histogram = cv2.calcHist([working], [0], None, [256], [0, 256]).ravel()
    total = float(histogram.sum()) or 1.0
    return ImageFacts(
        media_id,
        readable=True,
        width=width,
        height=height,
        sharpness=sharpness,
        clipped_highlights=float(histogram[250:].sum()) / total,
        clipped_shadows=float(histogram[:6].sum()) / total,
        phash=perceptual_hash(working),
        exif_taken_at=exif.taken_at if exif else None,
        exif_latitude=exif.latitude if exif else None,
        exif_longitude=exif.longitude if exif else None,
    )


def laplacian_variance(laplacian: np.ndarray) -> float:
    """The variance of the Laplacian, to the bit what ``cv2.meanStdDev`` gives squared (same
    sums, same formula) at a tenth of its cost: its 16-bit path is slow. ``cv2.norm``'s sum
    of squares is an integer off by rounding only, so it is rounded back."""
    scale = 1.0 / laplacian.size
    mean = cv2.sumElems(laplacian)[0] * scale
    squares = round(cv2.norm(laplacian, cv2.NORM_L2SQR))
    return math.sqrt(max(squares * scale - mean * mean, 0.0)) ** 2


def perceptual_hash(gray: np.ndarray) -> int:
    """pHash: the signs of the 8x8 lowest DCT frequencies of a 32x32 thumbnail against
    their median (as the imagehash package computes it)."""
    small = cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8].ravel()
    bits = low > np.median(low)
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def hash_array(hashes: Iterable[int]) -> npt.NDArray[np.uint64]:
    """64-bit hashes, signed (as stored) or not, as one array for :func:`hamming_all`."""
    return np.fromiter((h % (1 << 64) for h in hashes), dtype=np.uint64)


def hamming_all(a: int, hashes: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint8]:
    """:func:`hamming` from ``a`` to each of ``hashes`` at once (a batch's duplicate search
    compares each photo with thousands of candidates)."""
    counts: npt.NDArray[np.uint8] = np.bitwise_count(hashes ^ np.uint64(a % (1 << 64)))
    return counts
