"""POST /identify forwards one photo to plant identification (a fake of MOBIS' own PlantId
port here; the real API is exercised end to end in tests/test_mobis_e2e.py) and answers
suggestions; bad input is a 4xx problem."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from c4c.mobis.app import create_app
from c4c.mobis.remote import IngestOverHttp, PlantIdOverHttp
from c4c.mobis.settings import MobisSettings
from c4c.shared.auth import (
    PRINCIPAL_HEADER,
    Principal,
    PrincipalDep,
    PrincipalMiddleware,
    ensure_principal_secret,
    sign_principal,
    verify_principal,
)
from c4c.shared.clients import ServiceClients


class FakePlantId:
    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes, str, str]] = []
        self.users: list[str] = []
        self.answer: tuple[int, dict[str, Any]] = (200, {"results": []})

    async def identify(
        self, project: str, photo: bytes, content_type: str, organ: str, *, user: str
    ) -> tuple[int, dict[str, Any]]:
        self.calls.append((project, photo, content_type, organ))
        self.users.append(user)
        return self.answer


@pytest.fixture
def plantid() -> FakePlantId:
    return FakePlantId()


@pytest.fixture
async def client(
    settings: MobisSettings, ingest_client: httpx.AsyncClient, plantid: FakePlantId
) -> AsyncIterator[httpx.AsyncClient]:
    app: FastAPI = create_app(
        settings.model_copy(update={"identify_max_bytes": 4096}),
        ingest=IngestOverHttp(lambda: ingest_client),
        plantid=plantid,
    )
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://mobis.test") as c:
            secret = ensure_principal_secret(settings)
            anonymous = sign_principal(Principal("anonymous", "192.0.2.1"), secret)
            answer = await c.post(
                "/mobis/v1/auth/register",
                json={"email": "ro@example.org", "password": "correct horse battery"},
                headers={PRINCIPAL_HEADER: anonymous},
            )
            user = Principal("user", answer.json()["id"], scopes=frozenset({"mobis"}))
            c.headers[PRINCIPAL_HEADER] = sign_principal(user, secret)
            yield c


async def test_a_photo_is_forwarded_and_suggestions_answered(
    client: httpx.AsyncClient, plantid: FakePlantId, settings: MobisSettings
) -> None:
    species = {
        "scientificNameWithoutAuthor": "Bellis perennis",
        "family": {"scientificNameWithoutAuthor": "Asteraceae"},
        "commonNames": ["Daisy"],
    }
    plantid.answer = (200, {"results": [{"score": 0.87, "species": species}]})
    answer = await client.post(
        "/mobis/v1/identify?project=natusfera&organ=flower",
        files={"image": ("p.jpg", b"\xff\xd8photo", "image/jpeg")},
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["suggestions"] == [
        {
            "scientificName": "Bellis perennis",
            "score": 0.87,
            "family": "Asteraceae",
            "commonNames": ["Daisy"],
        }
    ]
    assert plantid.calls == [("natusfera", b"\xff\xd8photo", "image/jpeg", "flower")]
    me = verify_principal(client.headers[PRINCIPAL_HEADER], ensure_principal_secret(settings))
    assert plantid.users == [me.id]  # its quota, not one all the app's users share


async def test_plantid_is_asked_for_the_user(settings: MobisSettings) -> None:
    """The HTTP adapter signs the call as the user (plantid counts quotas by principal)."""
    seen: list[str] = []
    stand_in = FastAPI()

    @stand_in.post("/v2/identify/{project}")
    async def identify(project: str, principal: PrincipalDep) -> dict[str, Any]:
        assert principal is not None
        seen.append(f"{principal.kind}:{principal.id}")
        return {"results": []}

    clients = ServiceClients(settings)
    clients.use_in_process({"plantid": PrincipalMiddleware(stand_in, settings=settings)})
    try:
        answer = await PlantIdOverHttp(lambda: clients.client("plantid")).identify(
            "natusfera", b"\xff\xd8photo", "image/jpeg", "auto", user="u-7"
        )
    finally:
        await clients.aclose()
    assert answer == (200, {"results": []})
    assert seen == ["user:u-7"]


async def test_not_a_plant_is_an_empty_answer_not_an_error(
    client: httpx.AsyncClient, plantid: FakePlantId
) -> None:
    plantid.answer = (404, {"statusCode": 404, "message": "Species not found"})
    answer = await client.post(
        "/mobis/v1/identify?project=natusfera",
        content=b"\xff\xd8photo",
        headers={"Content-Type": "image/jpeg"},
    )
    assert answer.json() == {"project": "natusfera", "rejected": True, "suggestions": []}


@pytest.mark.parametrize(
    ("query", "body", "status"),
    [
        ("project=natusfera", b"", 400),
        ("project=natusfera", b"x" * 5000, 413),
        ("project=../../etc", b"photo", 422),
        ("project=natusfera&organ=root", b"photo", 422),
        ("", b"photo", 422),
    ],
)
async def test_bad_input_is_a_problem(
    client: httpx.AsyncClient,
    plantid: FakePlantId,
    query: str,
    body: bytes,
    status: int,
) -> None:
    answer = await client.post(
        f"/mobis/v1/identify?{query}", content=body, headers={"Content-Type": "image/jpeg"}
    )
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    assert plantid.calls == []
