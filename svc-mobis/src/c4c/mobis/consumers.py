"""Bus handlers (thin): scores, identifications and new versions of the users'
observations. Each applies its effect once per event id, then wakes the owner's live
streams (after the commit, so the stream finds the notification)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from c4c.mobis.repository import Repository
from c4c.mobis.schemas import ObservationIdentified, ObservationScored, ObservationUpdated
from c4c.mobis.service.observations import Observations
from c4c.mobis.wiring import Parts
from c4c.shared.app import Consumers, ServiceRuntime
from c4c.shared.bus import CloudEvent, Handler
from c4c.shared.inbox import idempotent

Apply = Callable[[Repository, CloudEvent, datetime], Awaitable[str | None]]


def consumers(parts: Callable[[], Parts]) -> Callable[[ServiceRuntime], Consumers]:
    def make(runtime: ServiceRuntime) -> Consumers:
        def notifying(name: str, apply: Apply) -> Handler:
            owners: dict[str, str] = {}

            async def effect(session: AsyncSession, event: CloudEvent) -> None:
                owner = await apply(Repository(session), event, event.time)
                if owner is not None:
                    owners[event.id] = owner

            handle = idempotent(runtime.db, name, effect, service=runtime.service)

            async def handle_then_wake(event: CloudEvent) -> None:
                try:
                    await handle(event)
                finally:
                    owner = owners.pop(event.id, None)
                if owner is not None:
                    parts().notifier.wake(owner)

            return handle_then_wake

        async def scored(repo: Repository, event: CloudEvent, when: datetime) -> str | None:
            data = ObservationScored.model_validate(event.data)
            return await Observations.apply_scored(repo, data, when)

        async def identified(repo: Repository, event: CloudEvent, when: datetime) -> str | None:
            data = ObservationIdentified.model_validate(event.data)
            return await Observations.apply_identified(repo, data, when)

        async def updated(session: AsyncSession, event: CloudEvent) -> None:
            data = ObservationUpdated.model_validate(event.data)
            await Observations.apply_updated(Repository(session), data)

        return {
            "observation.scored": notifying("mobis.scored", scored),
            "observation.identified": notifying("mobis.identified", identified),
            "observation.updated": idempotent(
                runtime.db, "mobis.version", updated, service=runtime.service
            ),
        }

    return make
