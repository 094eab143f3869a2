"""Each rule on realistic cases: the pure rules over a typed observation and a context."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from c4c.quality.geography import offline_geography
from c4c.quality.images import analyse, hamming, laplacian_variance
from c4c.quality.models import RuleSetRow
from c4c.quality.repository import IndexedPhoto
from c4c.quality.rules import CHECKS, CheckSettings, RuleSet, assess, dates, location, plausibility
from c4c.quality.rules.grade import community_taxon
from c4c.quality.rules.model import (
    Context,
    Duplicate,
    Identification,
    ImageFacts,
    Measurement,
    Observation,
)
from c4c.quality.service import DuplicateCandidates, QualityService, ruleset_from
from c4c.shared.taxonomy import backbone

NOW = datetime(2026, 11, 24, 12, tzinfo=UTC)
BARCELONA = {"latitude": 41.3851, "longitude": 2.1734, "country_code": "ES"}


@pytest.fixture(scope="module")
def geography() -> Any:
    return offline_geography().load()


def ctx(geography: Any = None, **values: Any) -> Context:
    return Context(now=NOW, geography=geography or offline_geography(), **values)


def codes(findings: list[Any]) -> set[str]:
    return {f.code for f in findings}


def run(check: str, obs: Observation, context: Context) -> set[str]:
    return codes(CHECKS[check].rule(obs, context, CHECKS[check].params))


# --- coordinates ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lat", "lon", "country", "expected"),
    [
        (41.3851, 2.1734, "ES", set()),
        (-41.3851, 2.1734, "ES", {"PRESUMED_NEGATED_LATITUDE"}),
        (52.5200, -13.4050, "DE", {"PRESUMED_NEGATED_LONGITUDE"}),
        (2.1734, 41.3851, "ES", {"PRESUMED_SWAPPED_COORDINATE"}),
        (-33.8688, -151.2093, "AU", {"PRESUMED_NEGATED_LONGITUDE"}),
        (48.8566, 2.3522, "ES", {"COUNTRY_COORDINATE_MISMATCH"}),
    ],
)
def test_country_against_coordinates(
    geography: Any, lat: float, lon: float, country: str, expected: set[str]
) -> None:
    obs = Observation(latitude=lat, longitude=lon, country_code=country)
    assert run("country", obs, ctx(geography)) == expected


def test_out_of_range_zero_and_swapped_beyond_range() -> None:
    assert run("coordinates", Observation(latitude=0.0, longitude=0.0), ctx()) == {
        "ZERO_COORDINATE"
    }
    assert run("coordinates", Observation(latitude=120.0, longitude=200.0), ctx()) == {
        "COORDINATE_OUT_OF_RANGE"
    }
    assert run("coordinates", Observation(latitude=151.2, longitude=-33.8), ctx()) == {
        "COORDINATE_OUT_OF_RANGE",
        "PRESUMED_SWAPPED_COORDINATE",
    }


def test_precision_and_uncertainty() -> None:
    assert run("coordinate_precision", Observation(latitude=41.4, longitude=2.2), ctx()) == {
        "COORDINATE_ROUNDED"
    }
    precise = Observation(latitude=41.3851, longitude=2.1734, uncertainty_m=-5)
    assert run("coordinate_precision", precise, ctx()) == {"COORDINATE_UNCERTAINTY_METERS_INVALID"}


# --- dates ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event_date", "expected"),
    [
        ("2024-02-29", set()),
        ("2023-02-29", {"RECORDED_DATE_INVALID"}),
        ("2024-13-01", {"RECORDED_DATE_INVALID"}),
        ("3024-05-03", {"RECORDED_DATE_UNLIKELY"}),
        ("2026-11-26T10:00:00Z", {"RECORDED_DATE_UNLIKELY"}),
        ("1500-06-01", {"RECORDED_DATE_UNLIKELY"}),
        ("2024", {"RECORDED_DATE_IMPRECISE"}),
        ("2024-05-01/2024-05-03", set()),
        ("yesterday", {"RECORDED_DATE_INVALID"}),
    ],
)
def test_recorded_date(event_date: str, expected: set[str]) -> None:
    assert run("recorded_date", Observation(event_date=event_date), ctx()) == expected


def test_exif_date_far_from_the_event_date() -> None:
    from c4c.quality.rules.model import Media

    photo = Media("m", "http://x/m", "image", exif_taken_at="2024-08-20T10:00:00")
    obs = Observation(event_date="2024-05-03", media=(photo,))
    assert run("exif_date", obs, ctx()) == {"RECORDED_DATE_MISMATCH"}
    assert dates.event_period("2024-05-03")[0].day == 3


# --- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind", "matched"),
    [
        ("Quercus ilex", "exact", "Quercus ilex"),
        ("quercus  ILEX", "exact", "Quercus ilex"),
        ("Quercus ilexx", "fuzzy", "Quercus ilex"),
        ("Bellis perenis", "fuzzy", "Bellis perennis"),
        ("Helianthus anuus", "fuzzy", "Helianthus annuus"),
        ("Quercus inventedii", "higherrank", "Quercus"),
        ("Crocus sp.", "exact", "Crocus"),
        ("Nonexistus fantasticus", "none", None),
    ],
)
def test_backbone_matching(name: str, kind: str, matched: str | None) -> None:
    match = backbone().match(name)
    assert match.kind == kind
    assert (match.taxon.scientific_name if match.taxon else None) == matched


def test_community_taxon_walks_up_the_ranks() -> None:
    def taxon_of(name: str) -> Any:
        return backbone().match(name).taxon

    agree = [Identification(f"u{i}", "Quercus ilex") for i in range(2)]
    assert community_taxon(agree, taxon_of).name == "Quercus ilex"  # type: ignore[union-attr]
    split = [
        Identification("a", "Quercus ilex"),
        Identification("b", "Quercus suber"),
        Identification("c", "Quercus robur"),
    ]
    result = community_taxon(split, taxon_of)
    assert result is not None
    assert (result.name, result.rank) == ("Quercus", "genus")
    two_to_one = [*agree, Identification("c", "Quercus suber")]
    assert community_taxon(two_to_one, taxon_of) is None or (
        community_taxon(two_to_one, taxon_of).name == "Quercus"  # type: ignore[union-attr]
    )
    three_to_one = [*agree, Identification("c", "Quercus ilex"), Identification("d", "Q. x")]
    assert community_taxon(three_to_one, taxon_of).name == "Quercus ilex"  # type: ignore[union-attr]
    machine_only = [Identification("m", "Quercus ilex", kind="machine")] * 3
    assert community_taxon(machine_only, taxon_of) is None


def test_research_grade_needs_agreement_media_and_a_wild_organism(geography: Any) -> None:
    from c4c.quality.rules.model import Media

    def taxon_of(name: str) -> Any:
        return backbone().match(name).taxon

    base: dict[str, Any] = {
        **BARCELONA,
        "event_date": "2024-05-03",
        "scientific_name": "Quercus ilex",
        "media": (Media("m", "http://x/m.jpg", "image"),),
        "identifications": tuple(Identification(f"u{i}", "Quercus ilex") for i in range(2)),
    }
    context = ctx(geography, taxon_match=backbone().match("Quercus ilex"), taxon_of=taxon_of)
    assert assess(Observation(**base), context, RuleSet("p")).grade == "research"
    captive = Observation(**base | {"captive": True})
    assert assess(captive, context, RuleSet("p")).grade == "casual"
    voted = Observation(**base | {"quality_votes": {"wild": {"agree": 0, "disagree": 2}}})
    assert assess(voted, context, RuleSet("p")).grade == "casual"
    one_id = Observation(**base | {"identifications": base["identifications"][:1]})
    assert assess(one_id, context, RuleSet("p")).grade == "needs_id"


# --- photos ---------------------------------------------------------------------------------


def photos(test_data: Path, species: str) -> list[Path]:
    return sorted((test_data / "plants" / species).glob("*.jpg"))


def test_blurred_photo_is_flagged_sharp_one_is_not(test_data: Path) -> None:
    path = photos(test_data, "Helianthus_annuus")[0]
    sharp = analyse(path.read_bytes(), "sharp", max_pixels=10**8)
    image = cv2.imread(str(path))
    blurred_bytes = cv2.imencode(".jpg", cv2.GaussianBlur(image, (0, 0), 4))[1].tobytes()
    blurred = analyse(blurred_bytes, "blurred", max_pixels=10**8)
    check = CHECKS["image_quality"]
    for facts, expected in ((sharp, False), (blurred, True)):
        findings = check.rule(Observation(), ctx(images=(facts,)), check.params)
        assert ("IMAGE_BLURRY" in codes(findings)) is expected


def test_laplacian_variance_is_meanstddev_squared_to_the_bit() -> None:
    rng = np.random.default_rng(3)
    grays = [
        np.full((17, 9), 200, dtype=np.uint8),
        np.zeros((1, 1), dtype=np.uint8),
        *(rng.integers(0, 256, (301, 457), dtype=np.uint8) for _ in range(4)),
        *(
            cv2.GaussianBlur(rng.integers(0, 256, (512, 384), dtype=np.uint8), (5, 5), sigma)
            for sigma in (0.5, 1, 2, 4)
        ),
    ]
    for gray in grays:
        laplacian = cv2.Laplacian(gray, cv2.CV_16S)
        _, deviation = cv2.meanStdDev(laplacian)
        assert laplacian_variance(laplacian) == float(deviation[0, 0]) ** 2


def test_reencoded_and_resized_copy_is_a_duplicate_another_photo_is_not(test_data: Path) -> None:
    first, second = photos(test_data, "Fritillaria_meleagris")[:2]
    original = analyse(first.read_bytes(), "a", max_pixels=10**8)
    image = cv2.imread(str(first))
    copy = cv2.resize(image, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
    copy_bytes = cv2.imencode(".jpg", copy, [cv2.IMWRITE_JPEG_QUALITY, 55])[1].tobytes()
    recoded = analyse(copy_bytes, "b", max_pixels=10**8)
    other = analyse(second.read_bytes(), "c", max_pixels=10**8)
    assert original.phash is not None
    assert recoded.phash is not None
    assert other.phash is not None
    limit = CHECKS["duplicates"].params["max_distance"]
    assert hamming(original.phash, recoded.phash) <= limit
    assert hamming(original.phash, other.phash) > limit


def _declaring(data: bytes, width: int, height: int) -> bytes:
    """A JPEG whose frame header declares another size (the pixels are left as they are)."""
    start = next(i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC2))
    size = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return data[: start + 5] + size + data[start + 9 :]


def test_truncated_and_bomb_images_are_flags_not_crashes(test_data: Path) -> None:
    data = photos(test_data, "Iris_sp")[0].read_bytes()
    truncated = analyse(data[: len(data) // 3], "t", max_pixels=10**8)
    bomb = analyse(data, "b", max_pixels=1000)
    # Past twice Pillow's own limit, so large that Pillow refuses to even size it.
    giant = analyse(_declaring(data, 60_000, 60_000), "g", max_pixels=10**10)
    check = CHECKS["image_quality"]
    for facts in (truncated, bomb, giant):
        assert not facts.readable
        findings = check.rule(Observation(), ctx(images=(facts,)), check.params)
        assert codes(findings) == {"IMAGE_UNREADABLE"}


# --- plausibility and sensors ---------------------------------------------------------------


def test_land_plant_in_the_open_sea(geography: Any) -> None:
    match = backbone().match("Quercus ilex")
    at_sea = Observation(latitude=38.0, longitude=-40.0)
    ashore = Observation(latitude=41.3851, longitude=2.1734)
    assert run("open_sea", at_sea, ctx(geography, taxon_match=match)) == {"TERRESTRIAL_IN_OPEN_SEA"}
    assert run("open_sea", ashore, ctx(geography, taxon_match=match)) == set()


def test_sensor_range_stuck_and_spike() -> None:
    def measured(value: float, unit: str = "°C") -> Observation:
        return Observation(measurements=(Measurement("air temperature", value, unit),))

    key = plausibility.measurement_key("air temperature", "°C")
    assert run("measurements", measured(150.0), ctx()) == {"MEASUREMENT_OUT_OF_RANGE"}
    assert run("measurements", measured(7.0, "pH"), ctx()) == set()
    stuck = ctx(recent_measurements={key: (21.5,) * 4})
    assert run("measurements", measured(21.5), stuck) == {"MEASUREMENT_STUCK"}
    history = ctx(recent_measurements={key: (20.1, 20.4, 19.8, 20.0, 20.3, 20.2)})
    assert run("measurements", measured(20.5), history) == set()
    assert run("measurements", measured(45.0), history) == {"MEASUREMENT_SPIKE"}


def test_valid_point_excludes_zero_and_out_of_range() -> None:
    assert location.valid_point(Observation(latitude=41.0, longitude=2.0))
    assert not location.valid_point(Observation(latitude=0.0, longitude=0.0))
    assert not location.valid_point(Observation(latitude=91.0, longitude=2.0))


def test_a_failing_check_is_skipped_not_the_assessment(geography: Any) -> None:
    # A rule set stored before parameters were bounded: 1e300 hours overflows a timedelta.
    bad = CheckSettings(params={"future_tolerance_hours": 1e300})
    ruleset = RuleSet(project="p", checks={"recorded_date": bad})
    obs = Observation(event_date="2099-01-01", **BARCELONA)
    result = assess(obs, ctx(geography), ruleset)
    assert not any(f.check == "recorded_date" for f in result.flags)
    assert "MEDIA_MISSING" in {f.code for f in result.flags}


def test_a_stored_rule_set_reads_its_invalid_values_as_defaults() -> None:
    def row(body: dict[str, Any]) -> RuleSetRow:
        return RuleSetRow(project="p", version=2, body=body, created_at=NOW)

    overflowing = {"checks": {"recorded_date": {"params": {"max_period_days": 1e300}}}}
    ruleset = ruleset_from("p", row(overflowing))
    assert ruleset.params("recorded_date")["max_period_days"] == 31
    unreadable = {"checks": {"recorded_date": {"params": {"future_tolerance_hours": None}}}}
    ruleset = ruleset_from("p", row(unreadable))
    assert ruleset.version == 2
    assert ruleset.params("recorded_date")["future_tolerance_hours"] == 24


def test_duplicate_search_finds_what_comparing_each_pair_finds() -> None:
    rng = random.Random(8)
    photos = [
        IndexedPhoto(f"m{i}", f"o{i % 40}", f"u{i % 7}", rng.getrandbits(64) - (1 << 63))
        for i in range(400)
    ]
    photos[5] = photos[5]._replace(phash=None)
    # Near copies of some candidates, among them one of the observation's own photos.
    hashes = [rng.getrandbits(64) for _ in range(6)]
    hashes += [(p.phash or 0) % (1 << 64) ^ (1 << rng.randrange(64)) for p in photos[:4]]
    # The first new photo copied many times, by the observer, by others and by nobody known
    # (an observation without recordedBy: not another user's).
    for i in range(100, 130):
        copy = photos[i]._replace(phash=(hashes[0] ^ (1 << (i % 64))) - (1 << 63))
        photos[i] = copy._replace(recorded_by=None) if i % 5 == 0 else copy
    facts = {f"new{i}": ImageFacts(f"new{i}", True, phash=h) for i, h in enumerate(hashes)}
    facts["m3"] = ImageFacts("m3", True, phash=(photos[3].phash or 0) % (1 << 64))
    facts["none"] = ImageFacts("none", True)
    obs = Observation(id="o1", recorded_by="u3")
    pairs = [
        Duplicate(f.media_id, p.observation_id, p.media_id, p.recorded_by, d)
        for f in facts.values()
        if f.phash is not None
        for p in photos
        if p.phash is not None
        and p.observation_id != obs.id
        and p.media_id != f.media_id
        and (d := hamming(f.phash, p.phash % (1 << 64))) <= 12
    ]
    # Per photo and kind (another user's, the observer's own): the closest, and how many.
    expected: dict[tuple[str | None, bool], Duplicate] = {}
    for pair in pairs:
        other = pair.other_recorded_by
        key = (pair.media_id, other is not None and other != obs.recorded_by)
        best = expected.get(key)
        closest = pair if best is None or pair.distance < best.distance else best
        expected[key] = replace(closest, matches=1 if best is None else best.matches + 1)
    found = QualityService._duplicates(obs, facts, DuplicateCandidates(photos), 12)
    assert found == list(expected.values())
    assert len(expected) >= 4  # the copies of new0 (two kinds), of m0, m2 and m3
    assert {d.matches for d in found} > {1}
