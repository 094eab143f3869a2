"""Bus handlers (thin): observations created and changed in ingest, and plant
identification's verdicts, scored into ``observation.scored``; once per event id.

The bus hands events to many concurrent handlers; they are gathered here and scored in
batches (:class:`Batcher`, :class:`Scorer`): under load one batch costs a few queries and
one short transaction for dozens of events. Events about the same observation in
one batch (its creation, then the update its photo brought) are scored once, in the state
they leave it in. A batch runs in three steps so that no database lock is held while
photos are fetched and analysed: read what to score, fetch its photos (no transaction open
meanwhile), then one transaction scores, writes the effects and records the event ids
together."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from c4c.quality.schemas import ObservationChanged, ObservationDeleted, ObservationIdentified
from c4c.quality.service import Change, PhotosChanged, Settled, settle_all
from c4c.quality.wiring import Parts
from c4c.shared.app import Consumers, ServiceRuntime
from c4c.shared.bus import CloudEvent
from c4c.shared.inbox import Batcher, claim, idempotent, unhandled

log = logging.getLogger("c4c.quality")

PREPARE_ATTEMPTS = 3
"""Reads and fetches before giving the events back to the bus, when the observations keep
changing between the read and the write."""
CONSUMER = {
    "observation.created": "quality.created",
    "observation.updated": "quality.updated",
    "observation.identified": "quality.identified",
}
"""The idempotency record of each scored event type."""


def consumer_of(event: CloudEvent) -> str:
    return CONSUMER[event.type]


def _bodies(states: Mapping[str, Settled]) -> list[dict[str, Any]]:
    return [state.body for state in states.values() if state.body is not None]


def change_of(event: CloudEvent) -> Change:
    if event.type == "observation.created":
        body = dict(event.data)
        return Change(str(body.get("id")), event.time, body=body)
    if event.type == "observation.updated":
        update = ObservationChanged.model_validate(event.data)
        return Change(update.id, event.time, changed=update.changed, version=update.version)
    verdict = ObservationIdentified.model_validate(event.data)
    return Change(verdict.observation_id, event.time, verdict=verdict.model_dump(mode="json"))


class Scorer:
    """Scores batches of events (see :class:`Batcher`)."""

    def __init__(self, parts: Parts, service: str) -> None:
        self.parts = parts
        self.service = service

    async def score(self, events: Sequence[CloudEvent]) -> None:
        """Score these events' observations once each; the events already handled are
        skipped, and all are recorded as handled with the effects."""
        db = self.parts.runtime.db
        for attempt in range(1, PREPARE_ATTEMPTS + 1):
            async with db.readers() as session:
                todo = await unhandled(session, events, consumer_of, service=self.service)
                if not todo:
                    return
                changes = [change_of(event) for event in todo]
                service = self.parts.service(session)
                prior = await service.seen(changes)
                states = settle_all(prior, changes)
                unknown = [id_ for id_, state in states.items() if state.missing]
                if not unknown:
                    wanted = await service.photos_to_fetch(_bodies(states))
            if unknown:
                # Settled again from the snapshots in hand: the write transaction reads them
                # anew, locked, in any case.
                changes = await self._fetch_unknown(changes, unknown)
                states = settle_all(prior, changes)
                async with db.readers() as session:
                    wanted = await self.parts.service(session).photos_to_fetch(_bodies(states))
            photos = await self.parts.photos.collect(wanted, retry_on_failure=True)
            try:
                async with db.sessions() as session, session.begin():
                    await claim(session, todo, consumer_of)
                    await self.parts.service(session, publish=True).apply(changes, photos)
                return
            except PhotosChanged:
                if attempt == PREPARE_ATTEMPTS:
                    raise
                log.info("photos changed meanwhile, fetching again", exc_info=True)

    async def _fetch_unknown(self, changes: list[Change], unknown: Sequence[str]) -> list[Change]:
        """Updates of observations this service never saw (their creation was missed): the
        whole observation as ingest has it now stands for the update."""
        fetched = dict(
            zip(
                unknown,
                await asyncio.gather(*(self.parts.fetch_observation(i) for i in unknown)),
                strict=True,
            )
        )
        for id_ in unknown:
            if fetched[id_] is None:
                log.info("update of an unknown observation", extra={"id": id_})
        return [
            dataclasses.replace(c, body=fetched[c.observation_id])
            if c.changed is not None and fetched.get(c.observation_id) is not None
            else c
            for c in changes
        ]


def consumers(parts_of: Callable[[ServiceRuntime], Parts]) -> Callable[[ServiceRuntime], Consumers]:
    def make(runtime: ServiceRuntime) -> Consumers:
        parts = parts_of(runtime)
        batcher = Batcher(
            Scorer(parts, runtime.service).score, linger=runtime.settings.event_linger_seconds
        )

        async def deleted(session: AsyncSession, event: CloudEvent) -> None:
            gone = ObservationDeleted.model_validate(event.data)
            await parts.service(session).deleted(gone.id)

        return {
            **dict.fromkeys(CONSUMER, batcher.handle),
            "observation.deleted": idempotent(
                runtime.db, "quality.deleted", deleted, service=runtime.service
            ),
        }

    return make
