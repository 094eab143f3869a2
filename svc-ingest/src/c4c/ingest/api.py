"""HTTP routes of the ingest service (thin: they parse, call ``service``, shape the answer)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Body, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.datastructures import UploadFile
from starlette.types import Message

from c4c.ingest.exports import csv_stream, dwca_stream, geojson_stream
from c4c.ingest.schemas import (
    BatchResult,
    ExportQuery,
    Identification,
    IdentificationOut,
    ListQuery,
    MediaOut,
    Observation,
    ObservationCreate,
    ObservationFilter,
    ObservationPage,
)
from c4c.ingest.service import BatchItem, IngestService, MediaUploads, creator_of, invalid_item
from c4c.ingest.settings import IngestSettings
from c4c.ingest.wiring import Creations, Parts
from c4c.shared.auth import current_principal
from c4c.shared.db import ReadSessionDep, SessionDep
from c4c.shared.problems import BadRequest, BodyTooLarge, Busy, ProblemError
from c4c.shared.responses import FileResponse

PREFIX = "/ingest/v1"
MEDIA_OVERHEAD = 1 << 20  # multipart framing and form fields around a media file
NDJSON_TYPES = ("application/x-ndjson", "application/jsonl", "application/json-seq")
IDEMPOTENCY_KEY_MAX = 255
BATCH_TURN_SECONDS = 30.0  # as long as a request waits for a pooled connection
UUID_PATTERN = r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$"
SEQ_MAX = 2**63 - 1  # a BIGINT: a cursor's larger number would fail in the database
IfMatch = Annotated[str | None, Header(alias="If-Match", max_length=1000)]
_BATCH = TypeAdapter(list[ObservationCreate])
Endpoint = Callable[..., Coroutine[Any, Any, Response]]


class UnsupportedBody(ProblemError):
    status, code, title = 415, "unsupported-media-type", "Unsupported content type"


class TooManyItems(BodyTooLarge):
    code, title = "batch-too-large", "Too many items in one batch"


class InvalidCursor(BadRequest):
    code, title = "invalid-cursor", "The cursor is not valid for this listing"


def _parts(request: Request) -> Parts:
    parts: Parts = request.app.state.parts
    return parts


def _service(request: Request, session: SessionDep) -> IngestService:
    return _parts(request).service(session)


def _location(observation_id: str) -> str:
    return f"{PREFIX}/observations/{observation_id}"


def encode_cursor(sort: str, value: datetime, seq: int) -> str:
    raw = json.dumps([sort, value.isoformat(), seq]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, sort: str) -> tuple[datetime, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        cursor_sort, value, seq = json.loads(raw)
        if cursor_sort != sort or type(seq) is not int or not 0 <= seq <= SEQ_MAX:
            raise ValueError(sort)
        when = datetime.fromisoformat(value)
        if when.tzinfo is None:
            raise ValueError(value)
        return when.astimezone(UTC), seq
    except (ValueError, TypeError, OverflowError, binascii.Error) as exc:
        raise InvalidCursor(
            "Use the cursor from the previous page, with the same sort.", cursor=cursor[:100]
        ) from exc


def limited_route(max_bytes: int, *, raw: bool = False) -> type[APIRoute]:
    """Routes that refuse bodies over ``max_bytes`` with a 413 problem, from Content-Length
    at once or while a chunked body streams in. (FastAPI's own ``max_body_size`` answers
    in plain text; the app-wide limit is raised for media uploads, see ``app``.) A ``raw``
    route's endpoint takes the request alone and answers a ``Response``: it is called as it
    is, as FastAPI's handler (dependency solving, answer serialisation) has nothing to do for
    it but costs about 40 µs of CPU per request."""

    class LimitedRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler: Callable[[Request], Coroutine[Any, Any, Response]] = (
                self.endpoint if raw else super().get_route_handler()
            )

            async def limited(request: Request) -> Response:
                length = request.headers.get("content-length", "")
                if length.isdigit() and int(length) > max_bytes:
                    raise _too_large(max_bytes)
                received = 0

                async def counting() -> Message:
                    nonlocal received
                    message = await request.receive()
                    received += len(message.get("body", b""))
                    if received > max_bytes:
                        raise _too_large(max_bytes)
                    return message

                return await handler(Request(request.scope, counting))

            return limited

    return LimitedRoute


def _inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON schema with its definitions inlined: a body documented through
    ``openapi_extra`` does not get its models into the document's components."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(definitions[node["$ref"].rsplit("/", 1)[1]])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    return dict(inline(schema))


CREATE_DOCS: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": _inline_schema(ObservationCreate)}},
    },
    "parameters": [
        {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "schema": {"type": "string", "maxLength": IDEMPOTENCY_KEY_MAX},
        }
    ],
}


def _is_json(content_type: str | None) -> bool:
    """As FastAPI decides it: none given, ``application/json`` or ``application/*+json``."""
    if not content_type:
        return True
    media_type = content_type.split(";")[0].strip().lower()
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


def _parse_observation(content_type: str | None, body: bytes) -> ObservationCreate:
    if not _is_json(content_type):
        raise UnsupportedBody("Send the observation as JSON (application/json).")
    try:
        return ObservationCreate.model_validate_json(body)
    except ValidationError as exc:  # answered as FastAPI answers a body it validated
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        ) from exc


def _idempotency_key(value: str | None) -> str | None:
    if value is not None and len(value) > IDEMPOTENCY_KEY_MAX:
        raise RequestValidationError(
            [
                {
                    "type": "string_too_long",
                    "loc": ("header", "Idempotency-Key"),
                    "msg": f"String should have at most {IDEMPOTENCY_KEY_MAX} characters",
                    "input": value,
                    "ctx": {"max_length": IDEMPOTENCY_KEY_MAX},
                }
            ]
        )
    return value


def _too_large(max_bytes: int) -> BodyTooLarge:
    return BodyTooLarge(
        f"The body is larger than the limit of {max_bytes} bytes.", limit_bytes=max_bytes
    )


class _LimitedRoutes:
    """Adds routes to ``router`` as :func:`limited_route` routes of ``max_bytes``: one router
    for every route of the service, as FastAPI matches a request again at each level of
    included routers (about 50 µs of CPU per create behind two levels, measured)."""

    def __init__(self, router: APIRouter, max_bytes: int, *, raw: bool = False) -> None:
        self.router = router
        self.route_class = limited_route(max_bytes, raw=raw)

    def post(self, path: str, **options: Any) -> Callable[[Endpoint], Endpoint]:
        return self._route("POST", path, options)

    def patch(self, path: str, **options: Any) -> Callable[[Endpoint], Endpoint]:
        return self._route("PATCH", path, options)

    def _route(
        self, method: str, path: str, options: dict[str, Any]
    ) -> Callable[[Endpoint], Endpoint]:
        def add(endpoint: Endpoint) -> Endpoint:
            self.router.add_api_route(
                path, endpoint, methods=[method], route_class_override=self.route_class, **options
            )
            return endpoint

        return add


def build_router(settings: IngestSettings) -> APIRouter:
    # Routes are tried in the order they are defined here: the create first, the hot path.
    router = APIRouter(prefix=PREFIX, tags=["ingest"])
    json_routes = _LimitedRoutes(router, settings.max_body_bytes)
    raw_routes = _LimitedRoutes(router, settings.max_body_bytes, raw=True)
    batch_routes = _LimitedRoutes(router, settings.batch_max_bytes)
    # Batches written at once: beyond a few, each observation costs more CPU for no gain in
    # rate (16 at once against 2: an eighth more here, a third more in PostgreSQL, measured),
    # and every batch holds a pooled connection. One that cannot start writing in
    # ``BATCH_TURN_SECONDS`` (a pooled connection's wait) gets a 503: parsed batches must not
    # pile up in memory, unanswered, under overload.
    batch_writers = asyncio.Semaphore(settings.batch_writers)

    @raw_routes.post(
        "/observations",
        status_code=201,
        response_model=Observation,
        summary="Create an observation (idempotent with a client id or Idempotency-Key)",
        responses={409: {"description": "The id or key was used with a different body."}},
        openapi_extra=CREATE_DOCS,
    )
    async def create_observation(request: Request) -> Response:
        # The body and header are read here, not declared: FastAPI's parsing (json.loads,
        # then validation of the Python objects) and its dependency solving cost more than
        # the rest of a create (~90 µs of CPU per request, measured).
        observation = _parse_observation(request.headers.get("content-type"), await request.body())
        idempotency_key = _idempotency_key(request.headers.get("idempotency-key"))
        creations: Creations = request.app.state.creations
        creator = creator_of(current_principal(request))
        result = await creations.create(observation, idempotency_key, creator)
        headers = {"Location": _location(result.observation["id"]), "ETag": result.etag}
        if not result.created:
            headers["Idempotent-Replayed"] = "true"
        return Response(
            orjson.dumps(result.observation),
            status_code=201,
            headers=headers,
            media_type="application/json",
        )

    @batch_routes.post(
        "/observations:batch",
        response_model=BatchResult,
        summary="Create many observations: a JSON array or NDJSON, one outcome per item",
        openapi_extra={
            "requestBody": {
                "content": {
                    "application/json": {"schema": {"type": "array", "items": {}}},
                    "application/x-ndjson": {"schema": {"type": "string"}},
                }
            }
        },
    )
    async def create_batch(request: Request) -> Response:
        items = await _read_batch(request, settings.batch_max_items)
        # Parsed before waiting its turn; written and committed in it.
        try:
            async with asyncio.timeout(BATCH_TURN_SECONDS):
                await batch_writers.acquire()
        except TimeoutError:
            raise Busy("Too many batches are being written; try again shortly.") from None
        try:
            async with _parts(request).unit() as service:
                outcomes = await service.create_batch(items, creator_of(current_principal(request)))
        finally:
            batch_writers.release()
        counts = Counter(o["status"] for o in outcomes)
        body = {
            "created": counts["created"],
            "duplicates": counts["duplicate"],
            "errors": counts["error"],
            "items": outcomes,
        }
        return Response(orjson.dumps(body), media_type="application/json")

    @router.get("/observations", response_model=ObservationPage, summary="List observations")
    async def list_observations(
        query: Annotated[ListQuery, Query()], request: Request, session: ReadSessionDep
    ) -> Response:
        after = decode_cursor(query.cursor, query.sort) if query.cursor else None
        items, last = await _service(request, session).page(query, after)
        headers, next_cursor = {}, None
        if last is not None:
            next_cursor = encode_cursor(query.sort, *last)
            url = request.url.include_query_params(cursor=next_cursor)
            headers["Link"] = f'<{url}>; rel="next"'
        return JSONResponse({"items": items, "next": next_cursor}, headers=headers)

    @router.get(
        "/observations:export",
        summary="Export observations (CSV, GeoJSON, Darwin Core Archive), streamed",
        response_class=StreamingResponse,
        responses={
            200: {"content": {"text/csv": {}, "application/geo+json": {}, "application/zip": {}}}
        },
    )
    async def export_observations(
        query: Annotated[ExportQuery, Query()], request: Request
    ) -> StreamingResponse:
        parts = _parts(request)
        async with parts.runtime.db.readers() as session:
            horizon = await parts.service(session).export_horizon()
        batches = _export_batches(parts, query, horizon)
        if query.format == "csv":
            return StreamingResponse(
                csv_stream(batches),
                media_type="text/csv; charset=utf-8",
                headers={"Content-Disposition": 'attachment; filename="observations.csv"'},
            )
        if query.format == "geojson":
            return StreamingResponse(
                geojson_stream(batches),
                media_type="application/geo+json",
                headers={"Content-Disposition": 'attachment; filename="observations.geojson"'},
            )
        return StreamingResponse(
            dwca_stream(batches, "Cos4Cloud observations"),
            media_type="application/zip",
            headers={"Content-Disposition": 'attachment; filename="observations-dwca.zip"'},
        )

    @router.get("/observations/{observation_id}", response_model=Observation)
    async def get_observation(
        observation_id: str, request: Request, session: ReadSessionDep
    ) -> Response:
        observation, tag = await _service(request, session).view(observation_id)
        if request.headers.get("if-none-match") in (tag, "*"):
            return Response(status_code=304, headers={"ETag": tag})
        return JSONResponse(observation, headers={"ETag": tag})

    @json_routes.patch(
        "/observations/{observation_id}",
        response_model=Observation,
        summary="Change an observation: a JSON merge patch, with If-Match",
    )
    async def patch_observation(
        observation_id: str,
        patch: Annotated[dict[str, Any], Body(media_type="application/merge-patch+json")],
        request: Request,
        session: SessionDep,
        if_match: IfMatch = None,
    ) -> Response:
        observation, tag = await _service(request, session).patch(observation_id, if_match, patch)
        return JSONResponse(observation, headers={"ETag": tag})

    @router.delete("/observations/{observation_id}", status_code=204, summary="Delete (soft)")
    async def delete_observation(
        observation_id: str, request: Request, session: SessionDep, if_match: IfMatch = None
    ) -> Response:
        await _service(request, session).delete(observation_id, if_match)
        return Response(status_code=204)

    @json_routes.post(
        "/observations/{observation_id}/identifications",
        status_code=201,
        response_model=IdentificationOut,
        summary="Add a community identification",
    )
    async def add_identification(
        observation_id: str, identification: Identification, request: Request, session: SessionDep
    ) -> Response:
        out = await _service(request, session).identify(observation_id, identification)
        return JSONResponse(out, status_code=201)

    @router.post(
        "/observations/{observation_id}/media",
        status_code=201,
        response_model=MediaOut,
        summary="Upload a photo, video or sound: multipart (field 'file') or the raw body",
        openapi_extra={
            "requestBody": {
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {"file": {"type": "string", "format": "binary"}},
                        }
                    },
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                }
            }
        },
    )
    async def upload_media(
        observation_id: str,
        request: Request,
        media_id: Annotated[str | None, Query(alias="mediaId", pattern=UUID_PATTERN)] = None,
    ) -> Response:
        uploads: MediaUploads = request.app.state.uploads
        media_id = media_id and media_id.lower()
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            async with request.form(max_files=1, max_fields=5) as form:
                upload = form.get("file")
                if not isinstance(upload, UploadFile):
                    raise BadRequest("Send the media in a multipart field named 'file'.")
                media, created = await uploads.add(
                    observation_id, media_id, _read(upload), upload.content_type
                )
        else:
            media, created = await uploads.add(
                observation_id, media_id, request.stream(), content_type or None
            )
        headers = {"Location": f"{PREFIX}/media/{media['id']}"}
        if not created:
            headers["Idempotent-Replayed"] = "true"
        return JSONResponse(media, status_code=201 if created else 200, headers=headers)

    @router.get(
        "/media/{media_id}",
        summary="A media file (public copy), with ETag and Range",
        response_class=FileResponse,
    )
    async def get_media(media_id: str, request: Request, session: ReadSessionDep) -> Response:
        media = await _service(request, session).media_file(media_id)
        if media.external_url:
            return RedirectResponse(media.external_url, status_code=307)
        tag = f'"{media.public_sha256}"'
        headers = {"ETag": tag, "Cache-Control": "public, max-age=86400"}
        if request.headers.get("if-none-match") in (tag, "*"):
            return Response(status_code=304, headers=headers)
        path = _parts(request).storage.local_path(media.public_key or "")
        assert path is not None  # the local disk adapter always has one
        return FileResponse(path, media_type=media.media_type, headers=headers)

    return router


async def _read(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(1 << 16):
        yield chunk


async def _read_batch(request: Request, max_items: int) -> list[BatchItem]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    items: list[BatchItem] = []

    def add(index: int, parsed: Any | None, raw: bytes | None) -> None:
        if index >= max_items:
            raise _too_many(max_items)
        try:
            model = (
                ObservationCreate.model_validate_json(raw)
                if raw is not None
                else ObservationCreate.model_validate(parsed)
            )
        except ValidationError as exc:
            items.append(invalid_item(index, exc))
        else:
            items.append(BatchItem(index, model))

    if content_type in NDJSON_TYPES:
        pending = b""
        index = 0
        async for chunk in request.stream():
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.strip():
                    add(index, None, line)
                    index += 1
        if pending.strip():
            add(index, None, pending)
        return items
    if content_type not in ("application/json", ""):
        raise UnsupportedBody(
            "Send a JSON array (application/json) or NDJSON (application/x-ndjson)."
        )
    body = await request.body()
    try:  # all valid, the usual case: parsed and validated in one pass, in Rust
        models = _BATCH.validate_json(body)
    except ValidationError:
        pass  # item by item below, for each one's outcome (or the body's problem)
    else:
        if len(models) > max_items:
            raise _too_many(max_items)
        return [BatchItem(index, model) for index, model in enumerate(models)]
    try:
        parsed = json.loads(body)
    except ValueError as exc:  # not JSON, not UTF-8, or an integer of over 4,300 digits
        raise BadRequest(f"The body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise BadRequest("The body is not valid JSON: it is nested too deeply.") from exc
    if not isinstance(parsed, list):
        raise BadRequest("The body must be a JSON array of observations.")
    for index, item in enumerate(parsed):
        add(index, item, None)
    return items


def _too_many(max_items: int) -> TooManyItems:
    return TooManyItems(f"A batch holds at most {max_items} observations.", max_items=max_items)


async def _export_batches(
    parts: Parts, query: ObservationFilter, horizon: int
) -> AsyncIterator[list[dict[str, Any]]]:
    """The export's batches, one short transaction each (a long read would hold SQLite's
    lock, and the response outlives the request's session)."""
    after: int | None = 0
    while after is not None:
        async with parts.runtime.db.readers() as session, session.begin():
            items, after = await parts.service(session).export_batch(query, after, horizon)
        if items:
            yield items
