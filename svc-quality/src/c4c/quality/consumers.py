"""Bus handlers (thin): observations created and changed in ingest, and plant
identification's verdicts, each scored into ``observation.scored``; once per event id.

Each scoring handler runs in two steps so that no database lock is held while photos are
fetched and analysed: first it reads what to score and fetches its photos (no transaction
open meanwhile), then a short transaction scores, writes the effect and records the event id
together (``c4c.shared.inbox.idempotent``)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from c4c.quality.schemas import ObservationChanged, ObservationDeleted, ObservationIdentified
from c4c.quality.service import Photos, PhotosChanged
from c4c.quality.wiring import Parts
from c4c.shared.app import Consumers, ServiceRuntime
from c4c.shared.bus import CloudEvent, Handler
from c4c.shared.inbox import idempotent

log = logging.getLogger("c4c.quality")

PREPARE_ATTEMPTS = 3
"""Reads and fetches before giving the event back to the bus, when the observation keeps
changing between the read and the write."""

T = TypeVar("T")


@dataclass
class Plan:
    """What the read step found: the observation to score (as ingest has it, when this
    service had not seen it) and its photos, analysed."""

    fetched: dict[str, Any] | None = None
    photos: Photos = field(default_factory=Photos)


async def _nothing(session: AsyncSession, event: CloudEvent) -> None:
    """The effect of an event already handled (``idempotent`` counts the duplicate)."""


def consumers(parts_of: Callable[[ServiceRuntime], Parts]) -> Callable[[ServiceRuntime], Consumers]:
    def make(runtime: ServiceRuntime) -> Consumers:
        parts = parts_of(runtime)
        db, name = runtime.db, runtime.service

        def read_then_write(
            consumer: str,
            prepare: Callable[[CloudEvent], Awaitable[T]],
            effect: Callable[[AsyncSession, CloudEvent, T], Awaitable[None]],
        ) -> Handler:
            async def handle(event: CloudEvent) -> None:
                for attempt in range(1, PREPARE_ATTEMPTS + 1):
                    async with db.sessions() as session:
                        done = await parts.service(session).repo.processed(consumer, event.id)
                    if done:
                        await idempotent(db, consumer, _nothing, service=name)(event)
                        return
                    prepared = await prepare(event)

                    async def write(session: AsyncSession, event: CloudEvent) -> None:
                        await effect(session, event, prepared)  # noqa: B023 - used at once

                    try:
                        await idempotent(db, consumer, write, service=name)(event)
                        return
                    except PhotosChanged:
                        if attempt == PREPARE_ATTEMPTS:
                            raise
                        log.info("photos changed meanwhile, fetching again", exc_info=True)

            return handle

        async def photos_of(body: dict[str, Any] | None) -> Photos:
            if body is None:
                return Photos()
            async with db.sessions() as session:
                wanted = await parts.service(session).photos_to_fetch(body)
            return await parts.photos.collect(wanted, retry_on_failure=True)

        async def snapshot(observation_id: str, changed: dict[str, Any] | None = None) -> Any:
            async with db.sessions() as session:
                return await parts.service(session).snapshot(observation_id, changed)

        # --- observation.created ----------------------------------------------------------

        async def prepare_created(event: CloudEvent) -> Photos:
            return await photos_of(dict(event.data))

        async def created(session: AsyncSession, event: CloudEvent, photos: Photos) -> None:
            await parts.service(session, publish=True).created(dict(event.data), event.time, photos)

        # --- observation.updated ----------------------------------------------------------

        async def prepare_updated(event: CloudEvent) -> Plan:
            change = ObservationChanged.model_validate(event.data)
            body = await snapshot(change.id, change.changed)
            if body is not None:
                return Plan(photos=await photos_of(body))
            fetched = await parts.fetch_observation(change.id)
            return Plan(fetched, await photos_of(fetched))

        async def updated(session: AsyncSession, event: CloudEvent, plan: Plan) -> None:
            change = ObservationChanged.model_validate(event.data)
            service = parts.service(session, publish=True)
            if await service.updated(
                change.id, change.version, change.changed, event.time, plan.photos
            ):
                return
            if plan.fetched is None:
                log.info("update of an unknown observation", extra={"id": change.id})
                return
            await service.created(plan.fetched, event.time, plan.photos)

        # --- observation.identified -------------------------------------------------------

        async def prepare_identified(event: CloudEvent) -> Photos:
            verdict = ObservationIdentified.model_validate(event.data)
            return await photos_of(await snapshot(verdict.observation_id))

        async def identified(session: AsyncSession, event: CloudEvent, photos: Photos) -> None:
            verdict = ObservationIdentified.model_validate(event.data)
            await parts.service(session, publish=True).identified(
                verdict.observation_id, verdict.model_dump(mode="json"), event.time, photos
            )

        # --- observation.deleted ----------------------------------------------------------

        async def deleted(session: AsyncSession, event: CloudEvent) -> None:
            gone = ObservationDeleted.model_validate(event.data)
            await parts.service(session).deleted(gone.id)

        return {
            "observation.created": read_then_write("quality.created", prepare_created, created),
            "observation.updated": read_then_write("quality.updated", prepare_updated, updated),
            "observation.deleted": idempotent(db, "quality.deleted", deleted, service=name),
            "observation.identified": read_then_write(
                "quality.identified", prepare_identified, identified
            ),
        }

    return make
