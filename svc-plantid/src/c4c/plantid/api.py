"""HTTP routes of the plantid service (thin: they call ``service``).

Two surfaces: the management API under ``/plantid/v1`` (problem+json errors like every
service), and the Pl@ntNet API v2 under ``/v2``, whose error bodies deliberately follow
Pl@ntNet (``{"statusCode", "error", "message"}``) so that Pl@ntNet clients read them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, ValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from c4c.plantid import schemas
from c4c.plantid.errors import InvalidQuery, SpeciesNotFound
from c4c.plantid.imports import SpeciesInfo
from c4c.plantid.repository import Repository
from c4c.plantid.service import (
    ORGANS,
    SECONDARY_ORGANS,
    Engine,
    Identifier,
    ImportRunner,
    PlantidService,
    rate_limit_headers,
)
from c4c.plantid.settings import PlantidSettings
from c4c.shared.auth import InvalidApiKey, current_principal
from c4c.shared.db import SessionDep
from c4c.shared.problems import ProblemError
from c4c.shared.responses import FileResponse
from c4c.shared.storage import BlobNotFound
from c4c.shared.text import STORABLE

VERSION = "0.1.0"
MAX_IMAGES = 5
LANGUAGES = ("en", "fr", "es", "de", "it", "pt", "nl", "ca", "cs", "pl")


_FORWARDED_HOST = re.compile(r"[A-Za-z0-9.:\[\]-]{1,300}")


def _public_base(request: Request) -> str:
    """The suite's URL as the caller reached it: through the gateway (which states it in
    ``X-Forwarded-Host``/``-Proto``), else this service's own."""
    host = request.headers.get("x-forwarded-host", "")
    proto = request.headers.get("x-forwarded-proto", "http")
    if _FORWARDED_HOST.fullmatch(host) and proto in ("http", "https"):
        return f"{proto}://{host}/"
    return str(request.base_url)


def _settings(request: Request) -> PlantidSettings:
    settings: PlantidSettings = request.app.state.runtime.settings
    return settings


def _engine(request: Request) -> Engine:
    engine: Engine = request.app.state.plantid_engine
    return engine


def _identifier(request: Request) -> Identifier:
    identifier: Identifier = request.app.state.plantid_identifier
    return identifier


async def _service(session: SessionDep, request: Request) -> PlantidService:
    return PlantidService(Repository(session), _engine(request), _settings(request))


async def _caller(request: Request) -> str:
    """Who is identifying (the quota's key): the principal the gateway vouched for, or the
    API key this service took when run alone with ``api_keys``, else 'anonymous'. Async, as
    every dependency of the identify route: FastAPI runs a plain function in a worker
    thread."""
    principal = current_principal(request)
    if principal is not None:
        return f"{principal.kind}:{principal.id}"
    return "anonymous"


ServiceDep = Annotated[PlantidService, Depends(_service)]
CallerDep = Annotated[str, Depends(_caller)]

router = APIRouter(prefix="/plantid/v1", tags=["plantid"])


# --- Pl@ntNet API v2 ------------------------------------------------------------------------


def plantnet_error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    body = {"statusCode": status, "error": HTTPStatus(status).phrase, "message": message}
    return JSONResponse(body, status_code=status, headers=headers)


def plantnet_refusal(exc: ProblemError) -> Response:
    """What the shared middleware refuses under ``/v2`` (no or a wrong API key, a body over
    the limit), in Pl@ntNet's shape and words."""
    message = "Invalid API key" if isinstance(exc, InvalidApiKey) else str(exc.detail)
    return plantnet_error(exc.status_code, message, dict(exc.headers or {}))


class PlantNetFailure(Exception):
    """An error already rendered in Pl@ntNet's shape. Raised (not returned) so that the
    request's database session still sees the error and rolls back."""

    def __init__(self, response: Response) -> None:
        self.response = response


async def on_plantnet_failure(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, PlantNetFailure)
    return exc.response


def _in_plantnet_shape(
    handler: Callable[[Request], Coroutine[Any, Any, Response]],
) -> Callable[[Request], Coroutine[Any, Any, Response]]:
    """``handler`` with its errors in Pl@ntNet's shape; invalid parameters are 400 there, not
    422."""

    async def handle(request: Request) -> Response:
        try:
            return await handler(request)
        except RequestValidationError as exc:
            fields = ", ".join(
                ".".join(str(p) for p in error.get("loc", ())[1:]) or "request"
                for error in exc.errors()
            )
            raise PlantNetFailure(plantnet_error(400, f"Invalid parameters: {fields}")) from exc
        except StarletteHTTPException as exc:
            raise PlantNetFailure(
                plantnet_error(exc.status_code, str(exc.detail), dict(exc.headers or {}))
            ) from exc

    return handle


class PlantNetRoute(APIRoute):
    """Errors in Pl@ntNet's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return _in_plantnet_shape(super().get_route_handler())


class DirectPlantNetRoute(PlantNetRoute):
    """For an endpoint that takes the request and its path parameters (strings) alone and
    reads the rest itself: called straight, without FastAPI's request handler (parameter
    solving, exit stacks, telemetry), which cost about 0.06 ms of the event loop's CPU per
    identification. Its OpenAPI still comes from its signature."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        solved = self.dependant
        path_params_only = all(param.field_info.annotation is str for param in solved.path_params)
        if (
            not path_params_only
            or solved.dependencies
            or self.body_field is not None
            or (solved.query_params or solved.header_params or solved.cookie_params)
        ):
            raise TypeError(f"{endpoint.__name__} takes more than the request and its path")

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint = self.endpoint

        async def call(request: Request) -> Response:
            response: Response = await endpoint(request=request, **request.path_params)
            return response

        return _in_plantnet_shape(call)


plantnet = APIRouter(prefix="/v2", tags=["Pl@ntNet API v2"], route_class=PlantNetRoute)


class _Part:
    """One part of a multipart body, in memory."""

    def __init__(self) -> None:
        self.disposition = b""
        self.data = bytearray()


async def _multipart(request: Request) -> list[tuple[str, str | None, bytes]]:
    """(name, filename or None, content) of each part of a multipart/form-data body, in
    order; 400 unless it is one with at most ``MAX_IMAGES`` files. Parsed here rather than by
    Starlette's form parser, which spools each file over 1 MB (a phone photo) to a temporary
    file, written and read back in worker threads. Memory is bounded by the body limit."""
    content_type, params = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise InvalidQuery("Send the photos as multipart/form-data.")
    parts: list[_Part] = []
    header = [b"", b""]  # name, value of the header being read

    def on_part_begin() -> None:
        if len(parts) == 2 * MAX_IMAGES + 10:
            raise InvalidQuery("Too many parts.")
        parts.append(_Part())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def on_header_end() -> None:
        if header[0].lower() == b"content-disposition":
            parts[-1].disposition = header[1]
        header[:] = [b"", b""]

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1].data += data[start:end]

    parser = MultipartParser(
        params[b"boundary"],
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
        },
    )
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise InvalidQuery("Invalid multipart data.") from exc
    if parser.state != MultipartState.END:  # cut short: no closing boundary
        raise InvalidQuery("Invalid multipart data.")
    out = []
    for part in parts:
        _, options = parse_options_header(part.disposition)
        if b"name" not in options:
            raise InvalidQuery('Each part needs a Content-Disposition "name".')
        filename = options.get(b"filename")
        content = bytes(part.data)
        part.data.clear()  # one copy of the body at a time, plus one part
        out.append(
            (
                options[b"name"].decode("utf-8", "replace"),
                None if filename is None else filename.decode("utf-8", "replace"),
                content,
            )
        )
    if sum(filename is not None for _, filename, _ in out) > MAX_IMAGES:
        raise InvalidQuery(f"Too many files. Maximum number of files is {MAX_IMAGES}.")
    return out


async def _form_photos(request: Request) -> tuple[list[bytes], list[str], list[str]]:
    """The repeated ``images`` and ``organs`` parts, in order; 400 when they do not pair."""
    parts = await _multipart(request)
    uploads = [(filename, data) for name, filename, data in parts if name == "images"]
    # One organ a part, as Pl@ntNet clients send them, or several comma-joined in one part,
    # as /docs (Swagger UI) sends an array.
    organs = [
        organ.strip().lower()
        for name, _, data in parts
        if name == "organs"
        for organ in data.decode("utf-8", "replace").split(",")
    ]
    if not uploads:
        raise InvalidQuery("Send 1 to 5 photos as repeated 'images' parts.")
    if any(filename is None for filename, _ in uploads):
        raise InvalidQuery("Each 'images' part must be a file.")
    if not organs:
        organs = ["auto"] * len(uploads)
    if len(organs) != len(uploads):
        raise InvalidQuery(
            f"{len(uploads)} images but {len(organs)} organs: send one organ per image."
        )
    unknown = sorted(set(organs) - set(ORGANS) - set(SECONDARY_ORGANS))
    if unknown:
        raise InvalidQuery(f"Unknown organs {unknown}; use {', '.join(ORGANS + SECONDARY_ORGANS)}.")
    if all(o in SECONDARY_ORGANS for o in organs):
        raise InvalidQuery("'habit' and 'other' are accepted only beside a primary organ.")
    photos = [data for _, data in uploads]
    names = [filename or f"image_{i}" for i, (filename, _) in enumerate(uploads)]
    return photos, organs, names


class IdentifyOptions(BaseModel):
    """The query parameters of ``POST /v2/identify``. The route reads them itself, in one
    validation: as FastAPI parameters (and the caller as a dependency), solving them cost
    about a quarter of the service's own CPU per request."""

    include_related_images: bool = Field(False, alias="include-related-images")
    no_reject: bool = Field(False, alias="no-reject")
    nb_results: int = Field(10, alias="nb-results", ge=1, le=100)
    lang: str = Field("en", pattern=r"^[a-z]{2}$")
    api_key: str | None = Field(None, alias="api-key", description="Or the X-API-Key header.")


def _identify_options(request: Request) -> IdentifyOptions:
    try:
        return IdentifyOptions.model_validate(dict(request.query_params))
    except ValidationError as exc:  # as FastAPI reports a query parameter's
        raise RequestValidationError(
            [{**error, "loc": ("query", *error["loc"])} for error in exc.errors()]
        ) from exc


IDENTIFY_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["images"],
                "properties": {
                    "images": {
                        "type": "array",
                        # As FastAPI describes an UploadFile (OpenAPI 3.1).
                        "items": {
                            "type": "string",
                            "contentMediaType": "application/octet-stream",
                        },
                        "minItems": 1,
                        "maxItems": MAX_IMAGES,
                        "description": "1 to 5 photos of one plant (JPEG or PNG)",
                    },
                    "organs": {
                        "type": "array",
                        "items": {"type": "string", "enum": [*ORGANS, *SECONDARY_ORGANS]},
                        "description": "One per image, in the same order; default auto",
                    },
                },
            },
        }
    },
}
"""The identify route reads its body itself (see :class:`DirectPlantNetRoute`): described
here so that the docs can send photos."""


def _identify_parameters() -> list[dict[str, Any]]:
    """``IdentifyOptions`` as OpenAPI query parameters."""
    schema = IdentifyOptions.model_json_schema(by_alias=True)
    return [
        {"name": name, "in": "query", "required": False, "schema": field}
        for name, field in schema["properties"].items()
    ]


async def identify(project: str, request: Request) -> Any:
    # No database session of the request's own: the identifier usually needs none (see
    # Identifier), at most a short one before inference.
    caller = await _caller(request)
    options = _identify_options(request)
    include_related_images, no_reject = options.include_related_images, options.no_reject
    nb_results, lang = options.nb_results, options.lang
    photos, organs, filenames = await _form_photos(request)
    moment = datetime.now(UTC)
    outcome, quota = await _identifier(request).identify(
        project,
        photos,
        organs,
        caller=caller,
        moment=moment,
        results=nb_results,
        related_images=include_related_images,
    )
    assert quota is not None  # charged to the caller
    if outcome.rejected and not no_reject:
        raise SpeciesNotFound("Species not found")
    query = schemas.Query(
        project=project,
        images=[hashlib.sha256(p).hexdigest()[:32] for p in photos],
        organs=organs,
        includeRelatedImages=include_related_images,
        noReject=no_reject,
    )
    body = schemas.identify_response(
        outcome,
        query=query,
        filenames=filenames,
        language=lang,
        remaining=quota.remaining,
        service_version=VERSION,
        # Building the URL costs more than it is worth when no image link needs it.
        base_url=_public_base(request) if include_related_images else "",
    )
    return Response(  # serialised by pydantic-core, without an intermediate dict
        body.model_dump_json(exclude_none=True),
        media_type="application/json",
        headers=rate_limit_headers(quota, moment),
    )


plantnet.add_api_route(
    "/identify/{project}",
    identify,
    methods=["POST"],
    route_class_override=DirectPlantNetRoute,
    response_model=schemas.IdentifyResponse,
    response_model_exclude_none=True,
    responses={
        400: {"model": schemas.PlantNetError},
        401: {"model": schemas.PlantNetError},
        404: {"model": schemas.PlantNetError, "description": "Species not found"},
        413: {"model": schemas.PlantNetError, "description": "Body over the limit"},
        429: {"model": schemas.PlantNetError, "description": "Daily quota used up"},
    },
    summary="Identify a plant from 1 to 5 photos (Pl@ntNet-compatible)",
    openapi_extra={"parameters": _identify_parameters(), "requestBody": IDENTIFY_BODY},
)


@plantnet.get("/projects", summary="The floras (projects) one can identify against")
async def plantnet_projects(service: ServiceDep, _: CallerDep) -> list[dict[str, Any]]:
    rows, counts = await service.projects()
    return [
        {
            "id": row.id,
            "title": row.title,
            "description": row.description or "",
            "speciesCount": counts.get(row.id, 0),
        }
        for row in rows
    ]


@plantnet.get("/languages", summary="Languages of common names")
async def plantnet_languages(_: CallerDep) -> list[str]:
    return list(LANGUAGES)


@plantnet.get("/quota", summary="The caller's identification quota today")
async def plantnet_quota(request: Request, caller: CallerDep) -> Any:
    moment = datetime.now(UTC)
    quota = await _identifier(request).ledger.quota(caller, moment)
    return JSONResponse(
        {"identify": {"limit": quota.limit, "used": quota.used, "remaining": quota.remaining}},
        headers=rate_limit_headers(quota, moment),
    )


# --- management API -------------------------------------------------------------------------


@router.post("/projects", status_code=201, response_model=schemas.ProjectOut)
async def create_project(body: schemas.ProjectIn, service: ServiceDep) -> schemas.ProjectOut:
    row = await service.create_project(body.id, body.title, body.description)
    return schemas.ProjectOut.of(row, 0)


@router.get("/projects", response_model=list[schemas.ProjectOut])
async def list_projects(service: ServiceDep) -> list[schemas.ProjectOut]:
    rows, counts = await service.projects()
    return [schemas.ProjectOut.of(row, counts.get(row.id, 0)) for row in rows]


@router.get("/projects/{project}", response_model=schemas.ProjectOut)
async def get_project(project: str, service: ServiceDep) -> schemas.ProjectOut:
    row = await service.project(project)
    _, counts = await service.projects()
    return schemas.ProjectOut.of(row, counts.get(row.id, 0))


@router.delete("/projects/{project}", status_code=204)
async def delete_project(project: str, service: ServiceDep) -> Response:
    await service.delete_project(project)
    return Response(status_code=204)


def _common_names(text: str | None) -> dict[str, list[str]]:
    """'en:Oxeye daisy;fr:Marguerite' → {'en': ['Oxeye daisy'], 'fr': ['Marguerite']}."""
    names: dict[str, list[str]] = {}
    for entry in (text or "").split(";"):
        language, _, name = entry.partition(":")
        if name.strip():
            names.setdefault(language.strip().lower() or "en", []).append(name.strip())
    return names


@router.post("/projects/{project}/references", status_code=201, response_model=schemas.EnrolmentOut)
async def enrol(
    project: str,
    service: ServiceDep,
    images: Annotated[list[UploadFile], File(description="Reference photos (JPEG/PNG).")],
    species: Annotated[str, Form(min_length=3, max_length=300, pattern=STORABLE)],
    organ: Annotated[str, Form(pattern=r"^(leaf|flower|fruit|bark|habit|other)$")] = "flower",
    author: Annotated[str | None, Form(max_length=200, pattern=STORABLE)] = None,
    license: Annotated[str | None, Form(max_length=200, pattern=STORABLE)] = None,
    authorship: Annotated[str | None, Form(max_length=300, pattern=STORABLE)] = None,
    genus: Annotated[str | None, Form(max_length=200, pattern=STORABLE)] = None,
    family: Annotated[str | None, Form(max_length=200, pattern=STORABLE)] = None,
    common_names: Annotated[
        str | None,
        Form(max_length=2000, pattern=STORABLE, description="'en:Oxeye daisy;fr:Marguerite'"),
    ] = None,
    gbif_id: Annotated[str | None, Form(pattern=r"^[0-9]{1,20}$")] = None,
) -> schemas.EnrolmentOut:
    info = SpeciesInfo(
        scientific_name=species,
        authorship=authorship,
        genus=genus,
        family=family,
        common_names=_common_names(common_names),
        gbif_id=gbif_id,
    )
    photos = [await image.read() for image in images]
    added, duplicates = await service.enrol(
        project, info, organ, photos, author=author, license=license
    )
    return schemas.EnrolmentOut(
        added=[schemas.ReferenceOut.of(r) for r in added], duplicates=duplicates
    )


@router.get("/projects/{project}/references", response_model=schemas.ReferencePage)
async def list_references(
    project: str,
    service: ServiceDep,
    species: Annotated[str | None, Query(max_length=300)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> schemas.ReferencePage:
    rows, total = await service.references(project, species=species, limit=limit, offset=offset)
    return schemas.ReferencePage(
        items=[schemas.ReferenceOut.of(r) for r in rows], total=total, limit=limit, offset=offset
    )


@router.get("/references/{reference_id}", response_model=schemas.ReferenceOut)
async def get_reference(reference_id: str, service: ServiceDep) -> schemas.ReferenceOut:
    return schemas.ReferenceOut.of(await service.reference(reference_id))


@router.get("/references/{reference_id}/image", response_class=FileResponse)
async def reference_image(reference_id: str, service: ServiceDep, request: Request) -> Response:
    row = await service.reference(reference_id)
    path = _engine(request).storage.local_path(row.media_key)
    if path is None or not path.is_file():
        raise BlobNotFound("The reference photo is missing from the media storage.")
    return FileResponse(path, media_type="image/jpeg")


@router.delete("/references/{reference_id}", status_code=204)
async def delete_reference(reference_id: str, service: ServiceDep) -> Response:
    await service.delete_reference(reference_id)
    return Response(status_code=204)


@router.get("/projects/{project}/gallery", response_model=schemas.GalleryOut)
async def gallery(project: str, request: Request) -> schemas.GalleryOut:
    built = await _identifier(request).gallery(project)
    return schemas.GalleryOut(
        project=project,
        version=built.version,
        references=len(built),
        species=built.species,
        rejectionThreshold=built.threshold,
        temperature=built.temperature,
    )


@router.post("/projects/{project}/imports", status_code=202, response_model=schemas.ImportOut)
async def start_import(
    project: str, body: schemas.ImportIn, service: ServiceDep, request: Request
) -> Response:
    row = await service.start_import(project, body.format, body.source)
    # Committed before the runner reads it: the session commits when the handler returns,
    # so the runner starts after the response.
    runner: ImportRunner = request.app.state.plantid_imports
    out = schemas.ImportOut.of(row)
    return JSONResponse(
        out.model_dump(mode="json"),
        status_code=202,
        headers={"Location": f"/plantid/v1/imports/{row.id}"},
        background=BackgroundTask(runner.start, row.id),
    )


@router.get("/imports/{import_id}", response_model=schemas.ImportOut)
async def get_import(import_id: str, service: ServiceDep) -> schemas.ImportOut:
    return schemas.ImportOut.of(await service.get_import(import_id))
