"""How the service's parts meet: the outbox as event sink, the suite's clients as media
source, the offline knowledge and the photo worker limit made once per app."""

from __future__ import annotations

from typing import Any

import anyio
from sqlalchemy.ext.asyncio import AsyncSession

from c4c.quality.repository import Repository
from c4c.quality.service import Knowledge, MediaSource, QualityService, RuleSetCache
from c4c.quality.settings import QualitySettings
from c4c.shared.app import ServiceRuntime


class OutboxSink:
    def __init__(self, runtime: ServiceRuntime, session: AsyncSession) -> None:
        self.runtime = runtime
        self.session = session

    def emit(self, type: str, data: dict[str, Any], subject: str) -> None:
        self.runtime.outbox.add(self.session, self.runtime.event(type, data, subject=subject))


class Parts:
    def __init__(self, runtime: ServiceRuntime, settings: QualitySettings) -> None:
        self.runtime = runtime
        self.settings = settings
        self.knowledge = Knowledge()
        self.image_limiter = anyio.CapacityLimiter(settings.image_workers)
        self.media: MediaSource = runtime.clients
        self.rulesets = RuleSetCache()

    def service(self, session: AsyncSession, *, publish: bool = False) -> QualityService:
        return QualityService(
            Repository(session),
            OutboxSink(self.runtime, session) if publish else None,
            self.settings,
            self.media,
            self.knowledge,
            self.image_limiter,
            self.rulesets,
        )

    async def fetch_observation(self, observation_id: str) -> dict[str, Any] | None:
        """The observation as ingest has it now (for an update whose creation we missed)."""
        response = await self.runtime.clients.client("ingest").get(
            f"/ingest/v1/observations/{observation_id}"
        )
        if response.status_code == 404:
            return None
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body
