"""Bus handlers (thin): scores, identifications and new versions of the users'
observations. The bus hands events to many concurrent handlers; they are gathered into
batches (:class:`Batcher`), and each batch is applied in one short transaction that records
its event ids with the effects (once per event id; events of observations no app synced are
let go unrecorded), then wakes the owners' live streams
(after the commit, so the streams find the notifications). A batch lingers a moment
(``event_linger_seconds``): the events of an upload trickle in (a new version, then a score)
and would each take a transaction of their own."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from c4c.mobis.schemas import ObservationIdentified, ObservationScored, ObservationUpdated
from c4c.mobis.service.observations import Observations, StateChange, subject_of
from c4c.mobis.wiring import Parts
from c4c.shared.app import Consumers, ServiceRuntime
from c4c.shared.bus import CloudEvent
from c4c.shared.inbox import Batcher, claim, unhandled

HANDLED: dict[str, tuple[str, Callable[[Any], StateChange]]] = {
    "observation.scored": ("mobis.scored", ObservationScored.model_validate),
    "observation.identified": ("mobis.identified", ObservationIdentified.model_validate),
    "observation.updated": ("mobis.version", ObservationUpdated.model_validate),
}
"""Event type → the idempotency record of its consumer, and its data."""


def consumer_of(event: CloudEvent) -> str:
    return HANDLED[event.type][0]


def consumers(parts: Callable[[], Parts]) -> Callable[[ServiceRuntime], Consumers]:
    def make(runtime: ServiceRuntime) -> Consumers:
        async def apply(events: Sequence[CloudEvent]) -> None:
            change = {id(e): HANDLED[e.type][1](e.data) for e in events}
            async with parts().unit() as repo:
                rows = await Observations.event_states(repo, list(change.values()))
                # Events of observations no app synced change nothing here: no record kept.
                ours = [e for e in events if subject_of(change[id(e)]) in rows]
                todo = await unhandled(repo.session, ours, consumer_of, service=runtime.service)
                await claim(repo.session, todo, consumer_of)
                owners = await Observations.apply_events(
                    repo, rows, [(change[id(e)], e.time) for e in todo]
                )
            for owner in owners:
                parts().notifier.wake(owner)

        return dict.fromkeys(
            HANDLED, Batcher(apply, linger=runtime.settings.event_linger_seconds).handle
        )

    return make
