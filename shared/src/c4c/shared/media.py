"""Media files checked from their bytes, never from what the client claims.

:func:`sniff` names the type from the first bytes (magic numbers); :func:`probe_image` reads
an image's size without decoding it first, refuses more pixels than a limit (decompression
bombs) with Pillow's own protection left on, decodes it once to catch truncated or corrupt
files, and reads the EXIF capture time and GPS position; :func:`strip_metadata` writes a
copy without EXIF/XMP (for observations whose location is obscured). The Pillow calls are
blocking: run them in a worker thread.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO, Literal

from PIL import Image, ImageOps, UnidentifiedImageError

from c4c.shared.problems import ProblemError

Kind = Literal["image", "video", "audio"]


class UnsupportedMediaType(ProblemError):
    status, code, title = 415, "unsupported-media-type", "Unsupported media type"


class MediaTypeMismatch(ProblemError):
    status, code, title = 415, "media-type-mismatch", "The content is not of the declared type"


class ImageTooLarge(ProblemError):
    status, code, title = 413, "image-too-large", "The image has too many pixels"


class CorruptMedia(ProblemError):
    status, code, title = 422, "corrupt-media", "The file is truncated or corrupt"


@dataclass(frozen=True)
class MediaType:
    mime: str
    kind: Kind
    extension: str


JPEG = MediaType("image/jpeg", "image", "jpg")
PNG = MediaType("image/png", "image", "png")
GIF = MediaType("image/gif", "image", "gif")
WEBP = MediaType("image/webp", "image", "webp")
HEIC = MediaType("image/heic", "image", "heic")
AVIF = MediaType("image/avif", "image", "avif")
MP4 = MediaType("video/mp4", "video", "mp4")
QUICKTIME = MediaType("video/quicktime", "video", "mov")
AVI = MediaType("video/x-msvideo", "video", "avi")
MATROSKA = MediaType("video/x-matroska", "video", "mkv")
WEBM = MediaType("video/webm", "video", "webm")
MPEG = MediaType("video/mpeg", "video", "mpg")
WAV = MediaType("audio/wav", "audio", "wav")
MP3 = MediaType("audio/mpeg", "audio", "mp3")
FLAC = MediaType("audio/flac", "audio", "flac")
OGG = MediaType("audio/ogg", "audio", "ogg")

KNOWN: tuple[MediaType, ...] = (JPEG, PNG, GIF, WEBP, HEIC, AVIF, MP4, QUICKTIME, AVI)
KNOWN += (MATROSKA, WEBM, MPEG, WAV, MP3, FLAC, OGG)
PILLOW_FORMATS = {JPEG.mime: "JPEG", PNG.mime: "PNG", GIF.mime: "GIF", WEBP.mime: "WEBP"}
"""Image types Pillow decodes here; HEIC/AVIF are recognised but not probed."""

GENERIC_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream"})
_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"}
_MP4_BRANDS_QT = {b"qt  "}


def sniff(head: bytes) -> MediaType | None:
    """The type of a file from its first bytes (a few dozen suffice), or None."""
    if head.startswith(b"\xff\xd8\xff"):
        return JPEG
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return PNG
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return GIF
    if head[:4] == b"RIFF" and len(head) >= 12:
        return {b"WEBP": WEBP, b"AVI ": AVI, b"WAVE": WAV}.get(head[8:12])
    if head[4:8] == b"ftyp" and len(head) >= 12:
        brand = head[8:12]
        if brand in _HEIF_BRANDS:
            return HEIC
        if brand in (b"avif", b"avis"):
            return AVIF
        return QUICKTIME if brand in _MP4_BRANDS_QT else MP4
    if head.startswith(b"\x1a\x45\xdf\xa3"):  # EBML: the doc type says which
        return WEBM if b"webm" in head[:64] else MATROSKA
    if head.startswith((b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3")):
        return MPEG
    if head.startswith(b"ID3") or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return MP3
    if head.startswith(b"fLaC"):
        return FLAC
    if head.startswith(b"OggS"):
        return OGG
    return None


def require_type(
    head: bytes, declared: str | None = None, *, kinds: frozenset[Kind] | None = None
) -> MediaType:
    """The sniffed type; 415 when it is unknown, not of ``kinds``, or not what the client
    ``declared`` (a generic declaration such as application/octet-stream is no claim)."""
    found = sniff(head)
    if found is None or (kinds is not None and found.kind not in kinds):
        accepted = ", ".join(t.mime for t in KNOWN if kinds is None or t.kind in kinds)
        raise UnsupportedMediaType(
            "The content is not of a supported type.", accepted=accepted.split(", ")
        )
    claim = (declared or "").split(";")[0].strip().lower()
    if claim not in GENERIC_TYPES and claim != found.mime and not _same_type(claim, found):
        raise MediaTypeMismatch(
            f"The content was declared {claim} but is {found.mime}.",
            declared=claim,
            detected=found.mime,
        )
    return found


_ALIASES = {"image/jpg": JPEG, "image/pjpeg": JPEG, "audio/x-wav": WAV, "audio/wave": WAV}
_ALIASES |= {"video/avi": AVI, "audio/mp3": MP3, "image/heif": HEIC}


def _same_type(claim: str, found: MediaType) -> bool:
    return _ALIASES.get(claim) == found


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    taken_at: str | None
    """EXIF DateTimeOriginal as ISO 8601 (with its offset when the camera wrote one)."""
    latitude: float | None
    longitude: float | None

    @property
    def has_gps(self) -> bool:
        return self.latitude is not None and self.longitude is not None


def probe_image(
    source: Path | BinaryIO, media_type: MediaType, *, max_pixels: int
) -> ImageInfo | None:
    """Check an image (a file, or bytes in hand as ``io.BytesIO``) and read its EXIF; None
    for image types not decoded here."""
    pillow_format = PILLOW_FORMATS.get(media_type.mime)
    if pillow_format is None:
        return None
    try:
        with warnings.catch_warnings():
            # Pillow warns past MAX_IMAGE_PIXELS and raises past twice that; our own limit
            # below is the one that answers, the warning only adds noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source, formats=[pillow_format]) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise _too_many_pixels(width, height, max_pixels)
                info = exif_info(image, width, height)
                if image.format == "JPEG":
                    # Decode at 1/8 scale: every byte is still parsed, so truncation shows.
                    image.draft("RGB", (max(width // 8, 1), max(height // 8, 1)))
                image.load()
    except Image.DecompressionBombError as exc:  # its size could not even be read first
        raise ImageTooLarge(
            f"The image has more than {max_pixels} pixels; at most {max_pixels} are accepted.",
            max_pixels=max_pixels,
        ) from exc
    except UnidentifiedImageError as exc:  # Pillow's message names our staging file
        raise CorruptMedia(f"The file is not a readable {media_type.mime} image.") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise CorruptMedia(f"The {media_type.mime} image cannot be decoded: {exc}") from exc
    return info


def _too_many_pixels(width: int, height: int, max_pixels: int) -> ImageTooLarge:
    return ImageTooLarge(
        f"The image is {width}x{height} pixels; at most {max_pixels} pixels are accepted.",
        width=width,
        height=height,
        max_pixels=max_pixels,
    )


_EXIF_IFD, _GPS_IFD, _ORIENTATION = 0x8769, 0x8825, 0x0112
_DATETIME_ORIGINAL, _OFFSET_ORIGINAL, _DATETIME = 0x9003, 0x9011, 0x0132


def exif_info(image: Image.Image, width: int, height: int) -> ImageInfo:
    """Size and EXIF capture time and position from an open image's header; decodes no
    pixels (for PNG without EXIF, Pillow loads the image to look for it)."""
    exif = image.getexif()
    details = exif.get_ifd(_EXIF_IFD)
    taken = details.get(_DATETIME_ORIGINAL) or exif.get(_DATETIME)
    taken_at = _exif_datetime(taken, details.get(_OFFSET_ORIGINAL))
    gps = exif.get_ifd(_GPS_IFD)
    latitude = _gps_degrees(gps.get(2), gps.get(1), "S", 90)
    longitude = _gps_degrees(gps.get(4), gps.get(3), "W", 180)
    if latitude is None or longitude is None:
        latitude = longitude = None
    return ImageInfo(width, height, taken_at, latitude, longitude)


def _exif_datetime(value: Any, offset: Any) -> str | None:
    """'2024:05:03 10:15:00' (+ '+02:00') → '2024-05-03T10:15:00+02:00'."""
    if not isinstance(value, str) or len(value) < 19:
        return None
    date, _, time = value.strip("\x00 ")[:19].partition(" ")
    parts = date.split(":")
    if len(parts) != 3 or not all(p.isdigit() for p in parts) or len(time) != 8:
        return None
    text = f"{'-'.join(parts)}T{time}"
    if isinstance(offset, str) and len(offset.strip("\x00 ")) == 6:
        text += offset.strip("\x00 ")
    return text


def _gps_degrees(value: Any, ref: Any, negative: str, limit: float) -> float | None:
    try:
        degrees, minutes, seconds = (Fraction(float(v)) for v in value)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):  # inf: OverflowError
        return None
    result = float(degrees + minutes / 60 + seconds / 3600)
    if isinstance(ref, bytes):
        ref = ref.decode("ascii", "replace")
    if isinstance(ref, str) and ref.strip("\x00 ").upper() == negative:
        result = -result
    return round(result, 7) if abs(result) <= limit else None


def strip_metadata(source: Path, target: Path | BinaryIO, media_type: MediaType) -> None:
    """Write ``source`` to ``target`` without EXIF, XMP or text chunks (a re-encode: JPEG
    keeps its quantisation tables, so the loss is minimal; the EXIF orientation is applied
    to the pixels first so the picture still stands the right way up)."""
    pillow_format = PILLOW_FORMATS.get(media_type.mime)
    if pillow_format is None:
        raise UnsupportedMediaType(f"Metadata cannot be removed from {media_type.mime} here.")
    with Image.open(source, formats=[pillow_format]) as image:
        rotated = image.getexif().get(_ORIENTATION, 1) not in (None, 1)
        for key in ("exif", "xmp", "XML:com.adobe.xmp", "comment", "photoshop"):
            image.info.pop(key, None)  # some encoders copy these from the source
        options: dict[str, Any] = {"exif": b""}
        icc = image.info.get("icc_profile")
        if icc:
            options["icc_profile"] = icc
        if pillow_format == "JPEG":
            options |= {"quality": 90} if rotated else {"quality": "keep", "subsampling": "keep"}
        elif pillow_format == "WEBP":
            options["lossless"] = bool(image.info.get("lossless", False))
        elif pillow_format == "GIF":
            options["save_all"] = True
        output = ImageOps.exif_transpose(image) if rotated else image
        output.save(target, format=pillow_format, **options)
