"""The body of POST /v2/identify: multipart parts read in memory, in order, whatever their
size; anything else a 400 in Pl@ntNet's shape."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Request, Response

from c4c.plantid.api import DirectPlantNetRoute

BOUNDARY = "c4c-boundary"
MULTIPART = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


def _form(*parts: tuple[str, str | None, bytes]) -> bytes:
    """A multipart body of (name or '' for none, filename, content) parts."""
    out = b""
    for name, filename, content in parts:
        disposition = "form-data" + (f'; name="{name}"' if name else "")
        disposition += f'; filename="{filename}"' if filename else ""
        out += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        out += content + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


@pytest.fixture
async def meadow(plantid: tuple[httpx.AsyncClient, Any], plants: Path) -> httpx.AsyncClient:
    client, _ = plantid
    await client.post("/plantid/v1/projects", json={"id": "meadow", "title": "Meadow"})
    photos = sorted((plants / "Viola_sp").glob("*.jpg"))[:3]
    response = await client.post(
        "/plantid/v1/projects/meadow/references",
        data={"species": "Viola sp."},
        files=[("images", (p.name, p.read_bytes(), "image/jpeg")) for p in photos],
    )
    assert response.status_code == 201, response.text
    return client


async def test_a_photo_of_several_megabytes_is_identified(
    meadow: httpx.AsyncClient, plants: Path
) -> None:
    """Bytes after a JPEG's end are ignored by decoders: a phone-sized upload."""
    photo = sorted((plants / "Viola_sp").glob("*.jpg"))[10].read_bytes()
    big = photo + bytes(range(256)) * 12_000  # ~3 MB, over Starlette's 1 MB spooling
    response = await meadow.post(
        "/v2/identify/meadow?no-reject=true",
        files=[("images", ("big.jpg", big, "image/jpeg")), ("organs", (None, "flower"))],
    )
    assert response.status_code == 200, response.text
    assert response.json()["bestMatch"].startswith("Viola")


async def test_organs_comma_joined_in_one_part_pair_with_the_images(
    meadow: httpx.AsyncClient, plants: Path
) -> None:
    """As /docs (Swagger UI) sends an array in a form: one part, comma-joined."""
    photos = sorted((plants / "Viola_sp").glob("*.jpg"))[10:12]
    images = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in photos]
    joined = await meadow.post(
        "/v2/identify/meadow?no-reject=true", files=[*images, ("organs", (None, "flower, leaf"))]
    )
    assert joined.status_code == 200, joined.text
    assert joined.json()["query"]["organs"] == ["flower", "leaf"]
    short = await meadow.post(
        "/v2/identify/meadow", files=[*images, ("organs", (None, "flower,leaf,fruit"))]
    )
    assert short.status_code == 400
    assert "2 images but 3 organs" in short.json()["message"]


@pytest.mark.parametrize(
    ("body", "headers", "message"),
    [
        (b'{"images": []}', {"content-type": "application/json"}, "multipart/form-data"),
        (_form(("organs", None, b"leaf")), {"content-type": "multipart/form-data"}, "form-data"),
        (_form(("images", "q.jpg", b"\xff\xd8\xff"))[:-20], MULTIPART, "Invalid multipart"),
        (b"no parts at all", MULTIPART, "Invalid multipart"),
        (_form(("", None, b"leaf")), MULTIPART, "name"),
        (_form(*[("organs", None, b"leaf")] * 21), MULTIPART, "Too many parts"),
    ],
    ids=["json", "no-boundary", "cut-short", "garbage", "no-name", "too-many-parts"],
)
async def test_a_body_that_is_not_a_sound_multipart_form_is_400(
    meadow: httpx.AsyncClient, body: bytes, headers: dict[str, str], message: str
) -> None:
    response = await meadow.post("/v2/identify/meadow", content=body, headers=headers)
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["statusCode"] == 400
    assert message in error["message"]


def test_only_an_endpoint_of_the_request_and_its_path_is_called_straight() -> None:
    async def by_path(project: str, request: Request) -> Response:
        return Response()

    async def with_query(project: str, request: Request, page: int = 1) -> Response:
        return Response()

    DirectPlantNetRoute("/identify/{project}", by_path, methods=["POST"])
    with pytest.raises(TypeError, match="more than the request and its path"):
        DirectPlantNetRoute("/identify/{project}", with_query, methods=["POST"])


async def test_the_documented_body_is_the_one_identify_reads(
    plantid: tuple[httpx.AsyncClient, Any],
) -> None:
    """The route reads its body itself, so FastAPI cannot describe it: the OpenAPI document
    does, or /docs could not send a photo."""
    client, _ = plantid
    operation = (await client.get("/openapi.json")).json()["paths"]["/v2/identify/{project}"][
        "post"
    ]
    form = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["images"]
    assert form["properties"]["images"]["items"]["contentMediaType"] == "application/octet-stream"
    assert "flower" in form["properties"]["organs"]["items"]["enum"]
    assert operation["responses"]["413"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/PlantNetError"
    )
