"""Responses whose errors are problem documents too.

Starlette's ``FileResponse`` answers a bad ``Range`` header itself, in plain text; this one
raises problems instead, which the app's handlers turn into ``application/problem+json``.
Serve files with it (``response_class=`` and the returned instance).
"""

from __future__ import annotations

from starlette import responses

from c4c.shared.problems import BadRequest, ProblemError


class MalformedRange(BadRequest):
    code, title = "malformed-range", "The Range header is malformed"


class RangeNotSatisfiable(ProblemError):
    status, code, title = 416, "range-not-satisfiable", "Range Not Satisfiable"


class FileResponse(responses.FileResponse):
    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        # Raised while the response is sent, before it starts: the route's exception
        # handlers still answer.
        try:
            return super()._parse_range_header(http_range, file_size)
        except responses.MalformedRangeHeader as exc:
            raise MalformedRange(
                f"{exc.content.rstrip('.')}; send e.g. Range: bytes=0-1023."
            ) from None
        except responses.RangeNotSatisfiable as exc:
            raise RangeNotSatisfiable(
                f"The file has {exc.max_size} bytes.",
                headers={"Content-Range": f"bytes */{exc.max_size}"},
            ) from None
