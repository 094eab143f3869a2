"""Photos from the outside world: only JPEG/PNG, bombs and truncated files refused with a
4xx problem, EXIF orientation applied, never larger than 1280 px, never upscaled."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from c4c.plantid.images import MAX_SIDE, decode_photo
from c4c.shared.problems import ProblemError


def _jpeg(size: tuple[int, int], **save: object) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (40, 160, 60)).save(out, format="JPEG", **save)
    return out.getvalue()


def _status(data: bytes) -> int:
    with pytest.raises(ProblemError) as caught:
        decode_photo(data, max_pixels=50_000_000)
    return caught.value.status


def test_non_images_are_415() -> None:
    assert _status(b"%PDF-1.7 definitely not a photo") == 415
    gif = io.BytesIO()
    Image.new("RGB", (10, 10)).save(gif, format="GIF")
    assert _status(gif.getvalue()) == 415  # an image, but not JPEG/PNG


def test_truncated_jpeg_is_422(plants: Path) -> None:
    photo = next((plants / "Primula_veris").glob("*.jpg")).read_bytes()
    assert _status(photo[: len(photo) // 2]) == 422


def test_more_pixels_than_the_limit_is_413_before_decoding() -> None:
    # The 20000x20000 PNG bomb itself goes through HTTP in tests/test_plantid_contract.py.
    with pytest.raises(ProblemError) as caught:
        decode_photo(_jpeg((300, 200)), max_pixels=300 * 200 - 1)
    assert caught.value.status == 413


def test_large_photo_is_brought_down_to_1280_and_small_one_kept() -> None:
    big = decode_photo(_jpeg((4000, 3000)), max_pixels=50_000_000)
    assert max(big.size) == MAX_SIDE
    assert big.size[0] / big.size[1] == pytest.approx(4 / 3, abs=0.01)
    small = decode_photo(_jpeg((300, 200)), max_pixels=50_000_000)
    assert small.size == (300, 200)


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    image = decode_photo(_jpeg((400, 200), exif=exif.tobytes()), max_pixels=50_000_000)
    assert image.size == (200, 400)


def test_png_is_accepted_as_rgb() -> None:
    out = io.BytesIO()
    Image.new("RGBA", (64, 32), (1, 2, 3, 128)).save(out, format="PNG")
    image = decode_photo(out.getvalue(), max_pixels=50_000_000)
    assert (image.mode, image.size) == ("RGB", (64, 32))


def test_for_the_model_a_jpeg_is_decoded_only_as_large_as_the_input_needs() -> None:
    photo = _jpeg((4000, 3000))
    image = decode_photo(photo, max_pixels=50_000_000, cover=224)
    assert min(image.size) >= 224  # libjpeg scales by 1/2..1/8: here 1/8, 500x375
    assert image.size == (500, 375)
    assert decode_photo(_jpeg((300, 200)), max_pixels=50_000_000, cover=224).size == (300, 200)
