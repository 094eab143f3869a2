"""Image evidence with OpenCV, decoded once: size, sharpness (variance of the Laplacian at a
fixed working size, so photos of any size compare), clipped highlights and shadows, and a
64-bit perceptual hash (DCT of a 32x32 thumbnail) that survives re-encoding and resizing.

CPU-bound and blocking (OpenCV releases the GIL): run it in a worker thread."""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from c4c.quality.rules.model import ImageFacts

WORKING_SIDE = 512
"""Long side the sharpness is measured at: the same detail scale whatever the photo's size."""


def analyse(data: bytes, media_id: str | None, *, max_pixels: int) -> ImageFacts:
    try:
        # The declared size first, so a decompression bomb is never inflated.
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        return ImageFacts(media_id, readable=False, error=f"not a decodable image: {exc}"[:200])
    if width * height > max_pixels:
        return ImageFacts(media_id, readable=False, error=f"{width}x{height} is too many pixels")
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
    if image is None:
        return ImageFacts(media_id, readable=False, error="truncated or corrupt image")
    height, width = image.shape
    scale = WORKING_SIDE / max(width, height)
    working = (
        cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        if scale < 1
        else image
    )
    sharpness = float(cv2.Laplacian(working, cv2.CV_32F).var())
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
    )


def perceptual_hash(gray: np.ndarray) -> int:
    """pHash: the signs of the 8x8 lowest DCT frequencies of a 32x32 thumbnail against
    their median (as the imagehash package computes it)."""
    small = cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8].ravel()
    bits = low > np.median(low)
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()
