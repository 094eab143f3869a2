"""RFC 9457 problem details: typed errors that carry their status, and the handlers that
turn every error — ours, FastAPI's validation errors, Starlette's HTTP errors — into an
``application/problem+json`` response with a stable ``type``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import DataError, DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_TYPE_PREFIX = "urn:c4c:problem:"


def problem_type(code: str) -> str:
    """The stable ``type`` URI of a problem code, e.g. ``urn:c4c:problem:validation-error``."""
    return PROBLEM_TYPE_PREFIX + code


class ProblemError(StarletteHTTPException):
    """An error that answers a request with a problem document.

    Subclass it per error with ``status``, ``code`` and ``title`` as class attributes;
    raise it with a ``detail`` for this occurrence and any extension members. It is an
    ``HTTPException`` so that FastAPI passes it through body parsing unchanged.
    """

    status: int = 500
    code: str = "internal-error"
    title: str = "Internal Server Error"

    def __init__(
        self,
        detail: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(self.status, detail or self.title, dict(headers or {}))
        self.extensions = extensions

    def to_response(self, instance: str | None = None) -> Response:
        return problem_response(
            self.status,
            type_=problem_type(self.code),
            title=self.title,
            detail=self.detail if self.detail != self.title else None,
            instance=instance,
            headers=self.headers,
            **self.extensions,
        )


RefusalShape = Callable[[ProblemError], Response]
"""Renders a refusal in the error shape of another API a service speaks under some prefix."""


class Refusals:
    """How the middleware a service shares (identity, body limits) answers a refusal: a
    problem document, or under a path prefix of ``shapes`` that prefix's own error shape (a
    Pl@ntNet client reads ``{statusCode, error, message}`` under ``/v2``)."""

    def __init__(self, shapes: Mapping[str, RefusalShape] | None = None) -> None:
        self.shapes = sorted((shapes or {}).items(), key=lambda item: len(item[0]), reverse=True)

    def response(self, exc: ProblemError, path: str) -> Response:
        for prefix, render in self.shapes:
            if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
                return render(exc)
        return exc.to_response(instance=path)


class BadRequest(ProblemError):
    status, code, title = 400, "bad-request", "Bad Request"


class NotFound(ProblemError):
    status, code, title = 404, "not-found", "Not Found"


class Conflict(ProblemError):
    status, code, title = 409, "conflict", "Conflict"


class LengthRequired(ProblemError):
    status, code, title = 411, "length-required", "Length Required"


class BodyTooLarge(ProblemError):
    status, code, title = 413, "body-too-large", "Content Too Large"


class InvalidValue(ProblemError):
    status, code, title = 422, "invalid-value", "A value cannot be stored"


class ServiceUnavailable(ProblemError):
    status, code, title = 503, "service-unavailable", "Service Unavailable"


class Busy(ProblemError):
    """Overloaded, not broken: the client may try again shortly."""

    status, code, title = 503, "busy", "Busy"

    def __init__(self, detail: str = "The service is overloaded; try again shortly.") -> None:
        super().__init__(detail, headers={"Retry-After": "1"})


def problem_response(
    status: int,
    *,
    type_: str = "about:blank",
    title: str | None = None,
    detail: str | None = None,
    instance: str | None = None,
    headers: Mapping[str, str] | None = None,
    **extensions: Any,
) -> Response:
    body: dict[str, Any] = {
        "type": type_,
        "title": title or HTTPStatus(status).phrase,
        "status": status,
    }
    if detail:
        body["detail"] = detail
    if instance:
        body["instance"] = instance
    body.update(extensions)
    return _ProblemJSON(
        jsonable_encoder(body), status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE
    )


class _ProblemJSON(JSONResponse):
    """ASCII JSON: a detail that echoes the client's input may hold a lone surrogate, which
    no UTF-8 encodes (a 500 while answering a 4xx); escaped, it is valid JSON."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode("ascii")


def _pointer(location: Sequence[int | str]) -> str:
    """A JSON Pointer (RFC 6901) to the field, without the leading 'body' segment."""
    parts = list(location[1:]) if location and location[0] == "body" else list(location)
    return "/" + "/".join(str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def validation_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Pydantic/FastAPI error entries as the per-field ``errors`` list of a problem."""
    out = []
    for err in errors:
        loc = tuple(err.get("loc", ()))
        if err.get("type") == "json_invalid":
            # Its location is ('body', <character offset>): no field to name.
            out.append(
                {
                    "field": None,
                    "in": "body",
                    "pointer": "",
                    "detail": f"The body is not valid JSON ({err.get('msg', 'invalid')})"
                    + (f" at character {loc[-1]}." if len(loc) > 1 else "."),
                    "code": "json_invalid",
                }
            )
            continue
        out.append(
            {
                "field": ".".join(str(p) for p in loc[1:] if loc) or None,
                "in": str(loc[0]) if loc else None,
                "pointer": _pointer(loc),
                "detail": err.get("msg", "invalid"),
                "code": err.get("type"),
            }
        )
    return out


async def _on_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProblemError)
    return exc.to_response(instance=request.url.path)


async def _on_validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = validation_errors(exc.errors())
    fields = ", ".join(e["field"] or e["in"] or "?" for e in errors)
    if errors and all(e["code"] == "json_invalid" for e in errors):
        fields = "the body is not valid JSON"
    return problem_response(
        422,
        type_=problem_type("validation-error"),
        title="Your request is not valid",
        detail=f"Invalid: {fields}",
        instance=request.url.path,
        errors=errors,
    )


async def _on_http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if exc.detail != HTTPStatus(exc.status_code).phrase else None
    return problem_response(
        exc.status_code,
        detail=detail,
        instance=request.url.path,
        headers=exc.headers,
    )


async def _on_pool_timeout(request: Request, exc: Exception) -> Response:
    # Every database connection stayed busy for the pool's timeout.
    return Busy().to_response(request.url.path)


_INVALID_VALUE_DETAIL = (
    "A value in the request is out of range or holds a character that cannot be stored "
    "(such as NUL)."
)


def _is_data_error(exc: BaseException) -> bool:
    """Whether the database refused a value (SQLSTATE class 22, "data exception": a NUL in a
    string, a number out of range) rather than failed."""
    if isinstance(exc, DataError):
        return True
    # asyncpg's errors reach SQLAlchemy as a generic DBAPI error carrying the SQLSTATE.
    code = getattr(getattr(exc, "orig", None), "pgcode", None)
    return isinstance(exc, DBAPIError) and isinstance(code, str) and code.startswith("22")


async def _on_database_error(request: Request, exc: Exception) -> Response:
    if not _is_data_error(exc):
        raise exc  # a failure of ours: the last-resort 500 (see ``http``)
    return InvalidValue(_INVALID_VALUE_DETAIL).to_response(instance=request.url.path)


async def _on_overflow(request: Request, exc: Exception) -> Response:
    # sqlite3 refuses an int beyond 64 bits while binding it, before SQLAlchemy wraps errors.
    if "SQLite" not in str(exc):
        raise exc
    return InvalidValue(_INVALID_VALUE_DETAIL).to_response(instance=request.url.path)


def install_problem_handlers(app: FastAPI) -> None:
    """Every handled error answers with a problem document (uncaught ones: see ``http``)."""
    app.add_exception_handler(ProblemError, _on_problem)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(PoolTimeout, _on_pool_timeout)
    app.add_exception_handler(DBAPIError, _on_database_error)
    app.add_exception_handler(OverflowError, _on_overflow)


PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "RFC 9457 problem details; a validation error lists each field in `errors`.",
    "type": "object",
    "properties": {
        "type": {"type": "string", "description": "urn:c4c:problem:<code>"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "field": {"type": "string"},
                    "in": {"type": "string"},
                    "pointer": {"type": "string"},
                    "detail": {"type": "string"},
                    "code": {"type": "string"},
                },
            },
        },
    },
    "required": ["type", "title", "status"],
    "additionalProperties": True,
}


def document_problems(app: FastAPI) -> None:
    """Make the app's OpenAPI document say what its errors look like: any operation may
    answer a problem document (``4XX``, unless it documents a code itself), and its 422 is
    one, not FastAPI's ``HTTPValidationError`` — except operations that document their
    errors in a shape of their own."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        document = plain()
        content = {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}
        for path_item in document.get("paths", {}).values():
            for operation in path_item.values():
                responses = operation.get("responses") if isinstance(operation, dict) else None
                if responses is None or _own_error_shape(responses):
                    continue
                if "422" in responses:
                    responses["422"]["content"] = content
                responses.setdefault("4XX", {"description": "A problem", "content": content})
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        schemas["Problem"] = PROBLEM_SCHEMA
        for unused in ("HTTPValidationError", "ValidationError"):
            if f"#/components/schemas/{unused}" not in str(document):
                schemas.pop(unused, None)
        app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented override


def _own_error_shape(responses: dict[str, Any]) -> bool:
    """An operation that documents its errors in another shape (plantid's Pl@ntNet API)."""
    return any(
        code.startswith("4")
        and code != "422"
        and set(answer.get("content", {})) - {PROBLEM_MEDIA_TYPE}
        for code, answer in responses.items()
    )
