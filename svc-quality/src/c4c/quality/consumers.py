"""Bus handlers (thin): observations created and changed in ingest, and plant
identification's verdicts, each scored into ``observation.scored``; once per event id."""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncSession

from c4c.quality.schemas import ObservationChanged, ObservationDeleted, ObservationIdentified
from c4c.quality.wiring import Parts
from c4c.shared.app import Consumers, ServiceRuntime
from c4c.shared.bus import CloudEvent
from c4c.shared.inbox import idempotent

log = logging.getLogger("c4c.quality")


def consumers(parts_of: Callable[[ServiceRuntime], Parts]) -> Callable[[ServiceRuntime], Consumers]:
    def make(runtime: ServiceRuntime) -> Consumers:
        parts = parts_of(runtime)

        async def created(session: AsyncSession, event: CloudEvent) -> None:
            await parts.service(session, publish=True).created(dict(event.data), event.time)

        async def updated(session: AsyncSession, event: CloudEvent) -> None:
            change = ObservationChanged.model_validate(event.data)
            service = parts.service(session, publish=True)
            if not await service.updated(change.id, change.version, change.changed, event.time):
                current = await parts.fetch_observation(change.id)
                if current is None:
                    log.info("update of an unknown observation", extra={"id": change.id})
                    return
                await service.created(current, event.time)

        async def deleted(session: AsyncSession, event: CloudEvent) -> None:
            gone = ObservationDeleted.model_validate(event.data)
            await parts.service(session).deleted(gone.id)

        async def identified(session: AsyncSession, event: CloudEvent) -> None:
            verdict = ObservationIdentified.model_validate(event.data)
            await parts.service(session, publish=True).identified(
                verdict.observation_id, verdict.model_dump(mode="json"), event.time
            )

        db, service = runtime.db, runtime.service
        return {
            "observation.created": idempotent(db, "quality.created", created, service=service),
            "observation.updated": idempotent(db, "quality.updated", updated, service=service),
            "observation.deleted": idempotent(db, "quality.deleted", deleted, service=service),
            "observation.identified": idempotent(
                db, "quality.identified", identified, service=service
            ),
        }

    return make
