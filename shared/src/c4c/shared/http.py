"""ASGI middleware every service runs: request ids, metrics and access logs, the refusal of
NUL characters in the URL, the last-resort 500 problem, and the request body size limit.
Pure ASGI, so bodies stream through untouched.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from c4c.shared.context import REQUEST_ID_HEADER, accept_request_id, request_id_var
from c4c.shared.metrics import HTTP_DURATION, HTTP_IN_FLIGHT, HTTP_REQUESTS, labelled
from c4c.shared.problems import (
    BadRequest,
    BodyTooLarge,
    LengthRequired,
    ProblemError,
    Refusals,
    problem_response,
    problem_type,
)

log = logging.getLogger("c4c.http")

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _has_nul(scope: Scope) -> bool:
    """A NUL in the decoded path or query string: no text column stores it (PostgreSQL
    refuses it), so no identifier or filter can hold it."""
    if "\x00" in scope["path"]:
        return True
    query: bytes = scope.get("query_string", b"")
    # ``0 in`` (a byte) and a str search: each about 10x faster than bytes in bytes.
    return bool(query) and (0 in query or "%00" in query.decode("latin-1"))


def route_template(scope: Scope) -> str:
    """The matched route's path template — never the raw path, which would explode labels."""
    route = scope.get("route")
    if isinstance(route, BaseRoute):
        path = getattr(route, "path", None)
        if isinstance(path, str):
            return str(scope.get("root_path", "")) + path
    return "<unmatched>"


class RequestContextMiddleware:
    """Gives each request an id (the caller's ``X-Request-ID`` when sane), echoes it, logs and
    measures the request by route template, refuses a NUL in the path or query string (400),
    and turns an uncaught exception into a 500 problem document that leaks nothing; a client
    that hangs up mid-request is only noted. ``access_log=False`` drops the log line (about a
    tenth of a millisecond per request in JSON), keeping the metrics."""

    def __init__(self, app: ASGIApp, *, service: str, access_log: bool = True) -> None:
        self.app = app
        self.service = service
        self.access_log = access_log
        self.in_flight = HTTP_IN_FLIGHT.labels(service)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = accept_request_id(_header(scope, b"x-request-id"))
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        in_flight = self.in_flight
        in_flight.inc()
        try:
            if _has_nul(scope):
                refusal = BadRequest("The path or query string holds a NUL character.")
                await refusal.to_response()(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            # Gone mid-upload: nobody to answer, nothing of ours failed.
            log.info("client disconnected", extra={"path": scope.get("path")})
            status = 499  # nginx's "client closed request", for the log and metrics
        except Exception:
            log.exception("unhandled error", extra={"path": scope.get("path")})
            if not response_started:
                response = problem_response(
                    500,
                    type_=problem_type("internal-error"),
                    detail=f"Something went wrong on our side; quote {REQUEST_ID_HEADER} "
                    f"{request_id} when reporting it.",
                    instance=scope.get("path"),
                )
                await response(scope, receive, send_with_id)
            status = 500
        finally:
            in_flight.dec()
            elapsed = time.perf_counter() - started
            route = route_template(scope)
            method = scope["method"]
            labelled(HTTP_REQUESTS, self.service, method, route, str(status)).inc()
            labelled(HTTP_DURATION, self.service, method, route).observe(elapsed)
            if self.access_log:
                self._log(scope, method, route, status, elapsed)
            request_id_var.reset(token)

    @staticmethod
    def _log(scope: Scope, method: str, route: str, status: int, elapsed: float) -> None:
        log.info(
            "%s %s %s",
            method,
            scope.get("path"),
            status,
            extra={
                "method": method,
                "path": scope.get("path"),
                "route": route,
                "status": status,
                "duration_ms": round(elapsed * 1000, 2),
            },
        )


class BodyLimitMiddleware:
    """Refuses bodies over ``max_bytes``: at once from ``Content-Length``, or while streaming
    a chunked body. A body-carrying method without either header gets 411. ``per_prefix``
    sets other limits under path prefixes (the longest matching prefix wins)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        per_prefix: Mapping[str, int] | None = None,
        refusals: Refusals | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.refusals = refusals or Refusals()
        self.per_prefix = sorted(
            (per_prefix or {}).items(), key=lambda item: len(item[0]), reverse=True
        )

    def _limit(self, path: str) -> int:
        for prefix, limit in self.per_prefix:
            if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
                return limit
        return self.max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self._limit(scope["path"])
        length = _header(scope, b"content-length")
        chunked = "chunked" in (_header(scope, b"transfer-encoding") or "").lower()
        error: ProblemError | None = None
        if length is not None:
            if not (length.isascii() and length.isdigit()):
                error = BadRequest("Content-Length is not a number.")
            elif int(length) > max_bytes:
                error = _too_large(max_bytes)
        elif not chunked and scope["method"] in _BODY_METHODS:
            error = LengthRequired("Send a Content-Length or a chunked body.")
        if error is not None:
            await self.refusals.response(error, scope["path"])(scope, receive, send)
            return

        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    raise _too_large(max_bytes)
            return message

        try:
            await self.app(scope, counting_receive, send)
        except BodyTooLarge as exc:
            # Raised from receive() where no exception handler caught it (plain ASGI apps).
            await self.refusals.response(exc, scope["path"])(scope, receive, send)


def _too_large(max_bytes: int) -> BodyTooLarge:
    return BodyTooLarge(
        f"The body is larger than the limit of {max_bytes} bytes.", limit_bytes=max_bytes
    )
