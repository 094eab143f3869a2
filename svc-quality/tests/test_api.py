"""The HTTP API: synchronous assessments, batches, history, rule sets, bad input."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

PREFIX = "/quality/v1"


async def test_a_good_observation_without_photo_needs_media(
    client: httpx.AsyncClient, observation: Any
) -> None:
    response = await client.post(f"{PREFIX}/assessments", json=observation())
    assert response.status_code == 200, response.text
    body = response.json()
    codes = {f["code"] for f in body["flags"]}
    assert codes == {"MEDIA_MISSING", "NOT_VERIFIABLE"}
    assert body["grade"] == "casual"
    assert body["score"] == 90.0
    assert body["ruleset"] == {"project": "natusfera", "version": 0}
    assert body["assessment_id"] is None


async def test_swapped_coordinates_and_misspelt_name_are_flagged(
    client: httpx.AsyncClient, observation: Any
) -> None:
    response = await client.post(
        f"{PREFIX}/assessments",
        json=observation(
            decimalLatitude=2.1734, decimalLongitude=41.3851, scientificName="Quercus ilexx"
        ),
    )
    flags = {f["code"]: f for f in response.json()["flags"]}
    assert "PRESUMED_SWAPPED_COORDINATE" in flags
    assert flags["TAXON_MATCH_FUZZY"]["evidence"]["matchedName"] == "Quercus ilex"
    assert flags["TAXON_MATCH_FUZZY"]["tip"] == "Did you mean Quercus ilex?"


async def test_an_internal_media_url_is_a_flag_not_a_fetch(
    client: httpx.AsyncClient, observation: Any
) -> None:
    media = [{"id": "m1", "url": "http://169.254.169.254/latest/meta-data", "type": "image"}]
    response = await client.post(f"{PREFIX}/assessments", json=observation(media=media))
    assert response.status_code == 200
    assert "MULTIMEDIA_URI_INVALID" in {f["code"] for f in response.json()["flags"]}


async def test_batch_gives_one_outcome_per_item(
    client: httpx.AsyncClient, observation: Any
) -> None:
    items = [observation(), {"decimalLatitude": "north"}, observation(eventDate="2023-02-29")]
    response = await client.post(f"{PREFIX}/assessments:batch", json=items)
    assert response.status_code == 200, response.text
    outcomes = response.json()["items"]
    assert [o["status"] for o in outcomes] == ["assessed", "error", "assessed"]
    assert outcomes[1]["problem"]["status"] == 422
    codes = {f["code"] for f in outcomes[2]["assessment"]["flags"]}
    assert "RECORDED_DATE_INVALID" in codes


async def test_rulesets_are_versioned_and_used(client: httpx.AsyncClient, observation: Any) -> None:
    first = await client.get(f"{PREFIX}/rulesets/natusfera")
    assert first.status_code == 200
    assert first.json()["version"] == 0
    assert "media_present" in first.json()["available_checks"]
    put = await client.put(
        f"{PREFIX}/rulesets/natusfera",
        json={"checks": {"media_present": {"enabled": False}}, "research_min_score": 70},
    )
    assert put.status_code == 200, put.text
    assert put.json()["version"] == 1
    again = await client.put(f"{PREFIX}/rulesets/natusfera", json={"checks": {}})
    assert again.json()["version"] == 2
    await client.put(
        f"{PREFIX}/rulesets/natusfera", json={"checks": {"media_present": {"enabled": False}}}
    )
    body = (await client.post(f"{PREFIX}/assessments", json=observation())).json()
    assert body["ruleset"] == {"project": "natusfera", "version": 3}
    assert "MEDIA_MISSING" not in {f["code"] for f in body["flags"]}


@pytest.mark.parametrize(
    ("method", "path", "payload"),
    [
        ("POST", "/assessments", {"decimalLatitude": "north"}),
        ("POST", "/assessments", {"media": "x"}),
        ("POST", "/assessments", {"eventDate": "x" * 1000}),
        ("POST", "/assessments", [1, 2]),
        ("POST", "/assessments:batch", {"not": "a list"}),
        ("PUT", "/rulesets/p", {"checks": {"nope": {}}}),
        ("PUT", "/rulesets/p", {"checks": {"coordinates": {"params": {"nope": 1}}}}),
        ("PUT", "/rulesets/p", {"checks": {"coordinates": {"weight": -1}}}),
        ("PUT", "/rulesets/p", {"research_min_score": 500}),
        ("PUT", "/rulesets/p", {"checks": {"duplicates": {"params": {"max_distance": 6.5}}}}),
        ("PUT", "/rulesets/p", {"checks": {"open_sea": {"params": {"penalty": True}}}}),
        ("PUT", "/rulesets/p", {"checks": {"measurements": {"params": {"ranges": {"c": [2, 1]}}}}}),
        ("GET", "/assessments/unknown", None),
    ],
)
async def test_bad_input_is_a_4xx_problem(
    client: httpx.AsyncClient, method: str, path: str, payload: Any
) -> None:
    response = await client.request(method, PREFIX + path, json=payload)
    assert 400 <= response.status_code < 500, response.text
    assert response.headers["content-type"].startswith("application/problem+json")


@pytest.mark.parametrize(
    ("check", "param", "value"),
    [
        ("recorded_date", "future_tolerance_hours", 1e300),
        ("recorded_date", "max_period_days", 99999999999),
        ("recorded_date", "earliest_year", {"a": [1.0]}),
        ("exif_location", "max_km", "Infinity"),
        ("exif_location", "max_km", "NaN"),
        ("measurements", "ranges", {"c": [0, "Infinity"]}),
    ],
)
async def test_a_parameter_out_of_its_range_is_refused_and_named(
    client: httpx.AsyncClient, observation: Any, check: str, param: str, value: Any
) -> None:
    # Infinity and NaN as bare JSON tokens, which Python's JSON parser accepts.
    body = json.dumps({"checks": {check: {"params": {param: value}}}})
    body = body.replace('"Infinity"', "Infinity").replace('"NaN"', "NaN")
    response = await client.put(
        f"{PREFIX}/rulesets/natusfera", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["parameter"] == param
    assessed = await client.post(f"{PREFIX}/assessments", json=observation())
    assert assessed.json()["ruleset"]["version"] == 0


async def test_malformed_json_and_huge_body_are_4xx(client: httpx.AsyncClient) -> None:
    broken = await client.post(
        f"{PREFIX}/assessments", content=b"{", headers={"content-type": "application/json"}
    )
    assert broken.status_code == 422
    huge = await client.post(
        f"{PREFIX}/assessments",
        content=b" " * (11 * 1024 * 1024),
        headers={"content-type": "application/json"},
    )
    assert huge.status_code == 413
