"""How the service's parts meet: the outbox as the service's event sink, and one
:class:`IngestService` per unit of work (a request's session, or a consumer's)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from c4c.ingest.repository import Repository
from c4c.ingest.service import IngestService
from c4c.ingest.settings import IngestSettings
from c4c.shared.app import ServiceRuntime
from c4c.shared.storage import MediaStorage


class OutboxSink:
    """Events written into the session's transaction; the relay sends them once committed."""

    def __init__(self, runtime: ServiceRuntime, session: AsyncSession) -> None:
        self.runtime = runtime
        self.session = session

    async def emit(self, type: str, items: Iterable[tuple[str, dict[str, Any]]]) -> None:
        events = [self.runtime.event(type, data, subject=subject) for subject, data in items]
        await self.runtime.outbox.add_many(self.session, events)


class Parts:
    """What every unit of work needs, made once per app."""

    def __init__(
        self, runtime: ServiceRuntime, settings: IngestSettings, storage: MediaStorage
    ) -> None:
        self.runtime = runtime
        self.settings = settings
        self.storage = storage

    def service(self, session: AsyncSession) -> IngestService:
        return IngestService(
            Repository(session), OutboxSink(self.runtime, session), self.settings, self.storage
        )
