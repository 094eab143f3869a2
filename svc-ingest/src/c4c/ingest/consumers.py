"""Bus handlers (thin): write-backs from quality and plant identification, and video
detections turned into observations. Each applies its effect once per event id.

The write-backs are gathered into batches (:class:`Batcher`): under load one transaction
and a few statements for dozens of events (every observation is scored twice, on creation
and when its photo arrives), and an observation a batch touches several times is written
once."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sqlalchemy.ext.asyncio import AsyncSession

from c4c.ingest.schemas import DetectionCreated, ObservationIdentified, ObservationScored
from c4c.ingest.settings import IngestSettings
from c4c.ingest.wiring import Parts
from c4c.shared.app import Consumers, ServiceRuntime
from c4c.shared.bus import CloudEvent
from c4c.shared.inbox import Batcher, claim, idempotent, unhandled
from c4c.shared.storage import MediaStorage

SCORED, IDENTIFIED = "observation.scored", "observation.identified"
CONSUMER = {SCORED: "ingest.score", IDENTIFIED: "ingest.identification"}
"""The idempotency record of each written-back event type."""


def consumer_of(event: CloudEvent) -> str:
    return CONSUMER[event.type]


def consumers(
    settings: IngestSettings, storage: MediaStorage
) -> Callable[[ServiceRuntime], Consumers]:
    def make(runtime: ServiceRuntime) -> Consumers:
        wired = Parts(runtime, settings, storage)
        db, service = runtime.db, runtime.service

        async def write_back(events: Sequence[CloudEvent]) -> None:
            """A batch of write-backs in one transaction, in the events' order; the ones
            handled already are skipped, the others recorded with their effects."""
            async with db.sessions() as session, session.begin():
                todo = await unhandled(session, events, consumer_of, service=service)
                if not todo:
                    return
                await claim(session, todo, consumer_of)
                ingest = wired.service(session)
                scores = [
                    (ObservationScored.model_validate(e.data), e.time)
                    for e in todo
                    if e.type == SCORED
                ]
                verdicts = [
                    (ObservationIdentified.model_validate(e.data), e.time)
                    for e in todo
                    if e.type == IDENTIFIED
                ]
                await ingest.apply_write_backs(scores, verdicts)

        async def detected(session: AsyncSession, event: CloudEvent) -> None:
            data = DetectionCreated.model_validate(event.data)
            await wired.service(session).apply_detection(data, event.time)

        batcher = Batcher(write_back, linger=runtime.settings.event_linger_seconds)
        return {
            **dict.fromkeys(CONSUMER, batcher.handle),
            "detection.created": idempotent(db, "ingest.detection", detected, service=service),
        }

    return make
