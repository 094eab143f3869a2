"""The request id of the work in hand, carried from HTTP requests into events and logs."""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar

REQUEST_ID_HEADER = "X-Request-ID"

request_id_var: ContextVar[str | None] = ContextVar("c4c_request_id", default=None)

# Accept a caller's id only when it is short and plain, so it cannot inject into logs.
_ACCEPTABLE_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")


def new_request_id() -> str:
    return uuid.uuid4().hex


def accept_request_id(candidate: str | None) -> str:
    """The caller's id if it is acceptable, otherwise a fresh one."""
    if candidate and _ACCEPTABLE_ID.match(candidate):
        return candidate
    return new_request_id()
