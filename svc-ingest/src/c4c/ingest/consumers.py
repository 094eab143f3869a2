"""Bus handlers (thin): write-backs from quality and plant identification, and video
detections turned into observations. Each applies its effect once per event id."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncSession

from c4c.ingest.schemas import DetectionCreated, ObservationIdentified, ObservationScored
from c4c.ingest.settings import IngestSettings
from c4c.ingest.wiring import Parts
from c4c.shared.app import Consumers, ServiceRuntime
from c4c.shared.bus import CloudEvent
from c4c.shared.inbox import idempotent
from c4c.shared.storage import MediaStorage


def consumers(
    settings: IngestSettings, storage: MediaStorage
) -> Callable[[ServiceRuntime], Consumers]:
    def make(runtime: ServiceRuntime) -> Consumers:
        wired = Parts(runtime, settings, storage)

        async def scored(session: AsyncSession, event: CloudEvent) -> None:
            data = ObservationScored.model_validate(event.data)
            await wired.service(session).apply_score(data, event.time)

        async def identified(session: AsyncSession, event: CloudEvent) -> None:
            data = ObservationIdentified.model_validate(event.data)
            await wired.service(session).apply_identified(data, event.time)

        async def detected(session: AsyncSession, event: CloudEvent) -> None:
            data = DetectionCreated.model_validate(event.data)
            await wired.service(session).apply_detection(data, event.time)

        db, service = runtime.db, runtime.service
        return {
            "observation.scored": idempotent(db, "ingest.score", scored, service=service),
            "observation.identified": idempotent(
                db, "ingest.identification", identified, service=service
            ),
            "detection.created": idempotent(db, "ingest.detection", detected, service=service),
        }

    return make
