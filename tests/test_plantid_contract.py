"""Contract of the Pl@ntNet-compatible endpoint, driven over real HTTP exactly as
Pl@ntNet's public clients call it: ``POST /v2/identify/{project}?api-key=…`` with repeated
multipart ``images`` and ``organs`` parts. Every field of the response, the 404 rejection,
400s, 401, 413 and 429 with its RateLimit headers."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
import uvicorn

from c4c.plantid.app import create_app
from c4c.plantid.settings import PlantidSettings

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

SPECIES = {
    "Leucanthemum_vulgare": ("Leucanthemum vulgare", "en:Oxeye daisy;fr:Marguerite", "3117424"),
    "Helianthus_annuus": ("Helianthus annuus", "en:Common sunflower", None),
    "Galanthus_nivalis": ("Galanthus nivalis", None, None),
    "Viola_sp": ("Viola sp.", None, None),
    "Primula_veris": ("Primula veris", "en:Cowslip", None),
}
ENROLLED = 7  # per species; the photos after them are queries the gallery never saw
QUOTA = 3
LIMIT = 3 * 1024 * 1024
KEYS = [f"contract-test-key-{i:03}" for i in range(12)]
NOT_FOUND = {"statusCode": 404, "error": "Not Found", "message": "Species not found"}


@dataclass
class Server:
    url: str
    plants: Path
    frame: bytes

    def photos(self, folder: str) -> list[Path]:
        return sorted((self.plants / folder).glob("*.jpg"))

    def query(self, folder: str, index: int = 0) -> bytes:
        return self.photos(folder)[ENROLLED + index].read_bytes()


def _frame(video: Path) -> bytes:
    import cv2  # opencv-python-headless, from svc-video

    capture = cv2.VideoCapture(str(video / "vtest.avi"))
    ok, frame = capture.read()
    capture.release()
    assert ok
    return bytes(cv2.imencode(".jpg", frame)[1].tobytes())


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(
    tmp_path_factory: pytest.TempPathFactory,
    test_data: Path,
    eventually: Callable[..., Awaitable[None]],
) -> AsyncIterator[Server]:
    settings = PlantidSettings(
        data_dir=tmp_path_factory.mktemp("plantid-contract"),
        api_keys=KEYS,
        daily_quota=QUOTA,
        identify_max_bytes=LIMIT,
        log_level="WARNING",
    )
    app = create_app(settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, lifespan="on")
    uv = uvicorn.Server(config)
    task = asyncio.create_task(uv.serve())
    await eventually(lambda: uv.started)
    port = uv.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    plants = test_data / "plants"
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        admin = {"X-API-Key": KEYS[0]}
        created = await client.post(
            "/plantid/v1/projects", json={"id": "spring", "title": "Spring flowers"}, headers=admin
        )
        assert created.status_code == 201, created.text
        for folder, (name, common, gbif) in SPECIES.items():
            data = {"species": name, "organ": "flower", "author": "Contract test"}
            data |= {"common_names": common} if common else {}
            data |= {"gbif_id": gbif} if gbif else {}
            photos = sorted((plants / folder).glob("*.jpg"))[:ENROLLED]
            response = await client.post(
                "/plantid/v1/projects/spring/references",
                data=data,
                files=[("images", (p.name, p.read_bytes(), "image/jpeg")) for p in photos],
                headers=admin,
            )
            assert response.status_code == 201, response.text
    try:
        yield Server(url, plants, _frame(test_data / "video"))
    finally:
        uv.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def identify(
    server: Server,
    photos: list[tuple[bytes, str]],
    *,
    key: str | None,
    project: str = "spring",
    **params: str,
) -> httpx.Response:
    """As Pl@ntNet's clients do: the key and options in the query string, each photo a
    repeated 'images' part and each organ a repeated 'organs' field, in the same order."""
    query = ({"api-key": key} if key is not None else {}) | params
    files = [
        ("images", (f"photo{i}.jpg", data, "image/jpeg")) for i, (data, _) in enumerate(photos)
    ]
    organs = {"organs": [organ for _, organ in photos]}
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        return await client.post(f"/v2/identify/{project}", params=query, files=files, data=organs)


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 20000x20000 greyscale PNG of a few hundred KB: 400 Mpx once decoded."""
    raw = zlib.compress(b"\x00" * (width + 1) * height, 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def _is_plantnet_error(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"statusCode", "error", "message"}
    assert body["statusCode"] == status
    assert isinstance(body["message"], str)
    assert body["message"]
    return body


async def test_identify_answers_every_plantnet_field(server: Server) -> None:
    photos = [
        (server.query("Leucanthemum_vulgare", 0), "flower"),
        (server.query("Leucanthemum_vulgare", 1), "leaf"),
    ]
    response = await identify(
        server,
        photos,
        key=KEYS[1],
        **{"include-related-images": "true", "nb-results": "3", "lang": "fr"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["query"]["project"] == "spring"
    assert body["query"]["organs"] == ["flower", "leaf"]
    assert len(body["query"]["images"]) == 2
    assert len(set(body["query"]["images"])) == 2
    assert body["query"]["includeRelatedImages"] is True
    assert body["query"]["noReject"] is False
    assert body["language"] == "fr"
    assert body["preferedReferential"] == "spring"
    assert "predictedOrgans" not in body  # no organ was 'auto'
    assert "efficientnet-lite0" in body["version"]
    assert "gallery" in body["version"]
    assert body["remainingIdentificationRequests"] == QUOTA - 1

    results = body["results"]
    assert 1 <= len(results) <= 3
    scores = [r["score"] for r in results]
    assert all(0 <= s <= 1 for s in scores)
    assert scores == sorted(scores, reverse=True)
    assert body["bestMatch"] == results[0]["species"]["scientificName"]
    names = [r["species"]["scientificNameWithoutAuthor"] for r in results]
    assert "Leucanthemum vulgare" in names
    daisy = results[names.index("Leucanthemum vulgare")]
    species = daisy["species"]
    assert species["scientificName"].startswith("Leucanthemum vulgare")
    assert species["genus"]["scientificNameWithoutAuthor"] == "Leucanthemum"
    assert species["family"]["scientificNameWithoutAuthor"] == "Asteraceae"  # offline taxonomy
    assert species["commonNames"] == ["Marguerite"]  # lang=fr
    assert daisy["gbif"] == {"id": "3117424"}
    assert daisy["images"], "related images were asked for"
    async with httpx.AsyncClient(timeout=30) as client:
        for image in daisy["images"]:
            assert image["organ"] == "flower"
            assert image["author"] == "Contract test"
            assert {"o", "m", "s"} <= set(image["url"])
            got = await client.get(image["url"]["m"], headers={"X-API-Key": KEYS[0]})
            assert got.status_code == 200
            assert got.headers["content-type"] == "image/jpeg"
    assert response.headers["RateLimit-Policy"] == f'"daily";q={QUOTA};w=86400'
    assert response.headers["RateLimit"].startswith(f'"daily";r={QUOTA - 1};t=')


async def test_auto_organ_gets_predicted_organs(server: Server) -> None:
    response = await identify(server, [(server.query("Primula_veris"), "auto")], key=KEYS[2])
    assert response.status_code == 200, response.text
    body = response.json()
    (predicted,) = body["predictedOrgans"]
    assert predicted["image"] == body["query"]["images"][0]
    assert predicted["filename"] == "photo0.jpg"
    assert predicted["organ"] == "flower"  # every reference was enrolled as a flower
    assert 0 < predicted["score"] <= 1
    assert "Primula veris" in [
        r["species"]["scientificNameWithoutAuthor"] for r in body["results"][:5]
    ]


async def test_not_a_plant_is_species_not_found_unless_no_reject(server: Server) -> None:
    response = await identify(server, [(server.frame, "auto")], key=KEYS[3])
    assert response.status_code == 404
    assert response.json() == NOT_FOUND
    kept = await identify(server, [(server.frame, "auto")], key=KEYS[3], **{"no-reject": "true"})
    assert kept.status_code == 200, kept.text
    assert kept.json()["query"]["noReject"] is True
    assert kept.json()["results"]


@pytest.mark.parametrize(
    ("organs", "count", "params"),
    [
        (["flower"], 2, {}),  # organ count != image count
        (["flower"] * 6, 6, {}),  # more than 5 images
        (["petal"], 1, {}),  # not an organ
        (["habit"], 1, {}),  # habit only beside a primary organ
        ([], 0, {}),  # no image at all
        (["flower"], 1, {"nb-results": "many"}),  # wrong type
    ],
)
async def test_bad_parameters_are_400(
    server: Server, organs: list[str], count: int, params: dict[str, str]
) -> None:
    photo = server.query("Viola_sp")
    files = [("images", (f"p{i}.jpg", photo, "image/jpeg")) for i in range(count)]
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        response = await client.post(
            "/v2/identify/spring",
            params={"api-key": KEYS[4]} | params,
            files=files or [("other", ("x.txt", b"x", "text/plain"))],
            data={"organs": organs},
        )
    assert _is_plantnet_error(response, 400)["error"] == "Bad Request"


async def test_non_image_and_bomb_are_4xx_never_500(server: Server) -> None:
    for data in (b"plain text, not a photo", bomb_png()):
        response = await identify(server, [(data, "flower")], key=KEYS[5])
        assert 400 <= response.status_code < 500, response.text
        _is_plantnet_error(response, response.status_code)


async def test_missing_or_wrong_key_is_401(server: Server) -> None:
    for key in (None, "not-a-key"):
        response = await identify(server, [(server.query("Viola_sp"), "flower")], key=key)
        assert _is_plantnet_error(response, 401) == {
            "statusCode": 401,
            "error": "Unauthorized",
            "message": "Invalid API key",
        }


async def test_body_over_the_limit_is_413(server: Server) -> None:
    big = b"\xff\xd8\xff" + b"\x00" * (LIMIT + 1024)
    response = await identify(server, [(big, "flower")], key=KEYS[6])
    _is_plantnet_error(response, 413)


async def test_quota_exhausted_is_429_with_ratelimit_headers(server: Server) -> None:
    photo = [(server.query("Galanthus_nivalis"), "flower")]
    for left in range(QUOTA - 1, -1, -1):
        ok = await identify(server, photo, key=KEYS[7], **{"no-reject": "true"})
        assert ok.status_code == 200, ok.text
        assert ok.json()["remainingIdentificationRequests"] == left
    over = await identify(server, photo, key=KEYS[7], **{"no-reject": "true"})
    body = _is_plantnet_error(over, 429)
    assert body["error"] == "Too Many Requests"
    assert over.headers["RateLimit-Policy"] == f'"daily";q={QUOTA};w=86400'
    assert over.headers["RateLimit"].startswith('"daily";r=0;t=')
    assert 0 < int(over.headers["Retry-After"]) <= 86400
    async with httpx.AsyncClient(base_url=server.url) as client:
        quota = await client.get("/v2/quota", params={"api-key": KEYS[7]})
    assert quota.json() == {"identify": {"limit": QUOTA, "used": QUOTA, "remaining": 0}}


async def test_projects_languages_and_unknown_project(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        projects = (await client.get("/v2/projects", params={"api-key": KEYS[8]})).json()
        languages = (await client.get("/v2/languages", params={"api-key": KEYS[8]})).json()
    assert projects == [
        {"id": "spring", "title": "Spring flowers", "description": "", "speciesCount": len(SPECIES)}
    ]
    assert {"en", "fr"} <= set(languages)
    response = await identify(
        server, [(server.query("Viola_sp"), "flower")], key=KEYS[8], project="nowhere"
    )
    assert _is_plantnet_error(response, 404)["message"] != NOT_FOUND["message"]
