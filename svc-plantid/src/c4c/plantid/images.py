"""Decoding uploaded photos safely: JPEG or PNG only (sniffed from the bytes), a pixel limit
checked from the header before anything is decoded (decompression bombs), truncated files
refused, EXIF orientation applied, and the long side brought down to ``MAX_SIDE`` (never
up); for the model alone, a JPEG is decoded straight at the smallest scale the model's input
still fits in (libjpeg's DCT scaling: several times less work than a full decode and
resize). Blocking: call it from a worker thread.

Type sniffing and the problem types come from :mod:`c4c.shared.media`; the decoding itself is
here because the shared module probes stored files by path, while identification decodes
request bytes into pixels.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from c4c.shared.media import (
    JPEG,
    PNG,
    CorruptMedia,
    ImageTooLarge,
    UnsupportedMediaType,
    require_type,
)

MAX_SIDE = 1280
ACCEPTED = frozenset({JPEG.mime, PNG.mime})


def decode_photo(
    data: bytes, *, max_pixels: int, max_side: int = MAX_SIDE, cover: int | None = None
) -> Image.Image:
    """An RGB image of ``data``, upright, its long side at most ``max_side``; a 4xx problem
    (415 not JPEG/PNG, 413 too many pixels, 422 truncated or corrupt) otherwise. With
    ``cover``, a JPEG may come out smaller, down to a short side of ``cover`` pixels (the
    model's input): what the model sees is the same, decoding is quicker."""
    media_type = require_type(data[:64], kinds=frozenset({"image"}))
    if media_type.mime not in ACCEPTED:
        raise UnsupportedMediaType(
            f"{media_type.mime} is not accepted here: send JPEG or PNG photos.",
            accepted=sorted(ACCEPTED),
        )
    try:
        with warnings.catch_warnings():
            # Our pixel limit answers first; Pillow's own bomb check stays on behind it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(
                io.BytesIO(data), formats=["JPEG" if media_type == JPEG else "PNG"]
            )
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLarge(
                    f"The image is {width}x{height} pixels; at most {max_pixels} are accepted.",
                    width=width,
                    height=height,
                    max_pixels=max_pixels,
                )
            if image.format == "JPEG":
                # Let libjpeg decode at 1/2..1/8 scale when that still leaves max_side pixels
                # (or, with cover, both sides at least cover pixels).
                target = (cover, cover) if cover else _draft_size(width, height, max_side)
                image.draft("RGB", target)
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            if image.mode != "RGB":
                image = image.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(str(exc), max_pixels=max_pixels) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise CorruptMedia(f"The {media_type.mime} image cannot be decoded: {exc}") from exc
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return image


def _draft_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    scale = max_side / max(width, height)
    return (
        (max(int(width * scale), 1), max(int(height * scale), 1)) if scale < 1 else (width, height)
    )


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()
