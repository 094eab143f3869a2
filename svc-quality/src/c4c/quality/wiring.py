"""How the service's parts meet: the outbox as event sink, the suite's clients as media
source, the offline knowledge, the caches and the photo worker limit made once per app."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
from sqlalchemy.ext.asyncio import AsyncSession

from c4c.quality.background import ContextCache
from c4c.quality.repository import Repository
from c4c.quality.service import Knowledge, MediaSource, PhotoAnalyser, QualityService
from c4c.quality.settings import QualitySettings
from c4c.shared.app import ServiceRuntime


class OutboxSink:
    def __init__(self, runtime: ServiceRuntime, session: AsyncSession) -> None:
        self.runtime = runtime
        self.session = session

    async def emit_many(self, type: str, items: Sequence[tuple[str, dict[str, Any]]]) -> None:
        await self.runtime.outbox.add_batch(self.session, type, items)


class Parts:
    def __init__(self, runtime: ServiceRuntime, settings: QualitySettings) -> None:
        self.runtime = runtime
        self.settings = settings
        self.knowledge = Knowledge()
        self.cache = ContextCache(settings.context_ttl_s)
        self.photos = PhotoAnalyser(
            runtime.clients, settings, anyio.CapacityLimiter(settings.image_workers)
        )

    @property
    def media(self) -> MediaSource:
        return self.photos.media

    @media.setter
    def media(self, source: MediaSource) -> None:
        """Another media source (tests and benchmarks: a fake instead of the network)."""
        self.photos.media = source

    def service(self, session: AsyncSession, *, publish: bool = False) -> QualityService:
        return QualityService(
            Repository(session),
            OutboxSink(self.runtime, session) if publish else None,
            self.settings,
            self.photos,
            self.knowledge,
            self.cache,
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
