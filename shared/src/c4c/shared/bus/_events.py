"""The CloudEvents 1.0 envelope every event travels in (structured JSON mode)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from c4c.shared.context import request_id_var

CLOUDEVENTS_MEDIA_TYPE = "application/cloudevents+json"


class CloudEvent(BaseModel):
    """A CloudEvents 1.0 event; ``requestid`` is our extension carrying ``X-Request-ID``."""

    model_config = ConfigDict(frozen=True, extra="allow")

    specversion: str = "1.0"
    id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    source: str
    type: str
    time: datetime = Field(default_factory=lambda: datetime.now(UTC))
    subject: str | None = None
    datacontenttype: str = "application/json"
    data: Any = None
    requestid: str | None = None

    def to_json(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    @classmethod
    def from_json(cls, body: bytes | str) -> CloudEvent:
        return cls.model_validate_json(body)


def event_source(service: str) -> str:
    """The ``source`` of the events ``service`` publishes."""
    return f"/c4c/{service}"


def new_event(service: str, type: str, data: Any, *, subject: str | None = None) -> CloudEvent:
    """An event from ``service``, carrying the request id of the work in hand."""
    return CloudEvent(
        source=event_source(service),
        type=type,
        subject=subject,
        data=data,
        requestid=request_id_var.get(),
    )
