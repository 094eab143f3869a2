"""The event bus port: what every adapter promises, and the delivery rules they share.

Contract (the same for the in-process bus and RabbitMQ):
- ``publish`` returns once the bus holds the event (a broker confirm), or raises
  :class:`PublishError` after ``publish_timeout``; it may deliver an event twice, never zero
  times once it has returned.
- A queue receives every event whose type matches one of its patterns (AMQP topic rules);
  subscribers of one queue compete for its events.
- A handler that returns has consumed the event; one that raises gets it again after a
  growing delay, and after ``delivery_limit`` deliveries the event is parked in the queue's
  dead-letter queue with the reason, never lost and never looped forever.
- ``close`` stops taking events and waits (up to a timeout) for those in hand.
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from c4c.shared.bus._events import CloudEvent
from c4c.shared.context import request_id_var
from c4c.shared.metrics import BUS_CONSUMED, BUS_DEAD_LETTERED, BUS_HANDLER_DURATION, labelled

Handler = Callable[[CloudEvent], Awaitable[None]]

log = logging.getLogger("c4c.bus")


class PublishError(Exception):
    """The bus did not confirm an event in time; the caller still owns it."""


@dataclass(frozen=True)
class BusOptions:
    exchange: str = "c4c.events"
    prefetch: int = 64
    delivery_limit: int = 5
    publish_timeout: float = 10.0
    retry_backoff: float = 0.2
    max_retry_backoff: float = 30.0

    def backoff(self, attempt: int) -> float:
        """Delay before delivery number ``attempt + 1``."""
        return float(min(self.retry_backoff * 2 ** (attempt - 1), self.max_retry_backoff))


@dataclass(frozen=True)
class DeadLetter:
    """An event parked after its handler failed ``attempts`` times (or that was unreadable)."""

    queue: str
    body: bytes
    reason: str
    attempts: int

    @property
    def event(self) -> CloudEvent:
        return CloudEvent.from_json(self.body)


class EventBus(abc.ABC):
    def __init__(self, options: BusOptions) -> None:
        self.options = options

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def close(self, timeout: float = 30.0) -> None: ...

    @abc.abstractmethod
    async def publish(self, event: CloudEvent) -> None: ...

    async def publish_encoded(self, body: bytes, *, event_id: str, type: str, source: str) -> None:
        """Publish an event already encoded (an outbox row's body, a CloudEvent's JSON), whose
        ``id``, ``type`` and ``source`` are given, with :meth:`publish`'s promise. An adapter
        that can send the bytes as they are overrides this: a model per event, parsed and
        encoded again, was more than half of a relay's CPU per event (measured)."""
        await self.publish(CloudEvent.from_json(body))

    @abc.abstractmethod
    async def subscribe(self, queue: str, patterns: Sequence[str], handler: Handler) -> None:
        """Bind ``queue`` to ``patterns`` and consume it with ``handler``; before or after
        ``start``."""

    @abc.abstractmethod
    async def ping(self) -> bool:
        """Whether the bus can take events now (readiness)."""

    @abc.abstractmethod
    async def dead_letters(self, queue: str) -> list[DeadLetter]:
        """The events parked in ``queue``'s dead-letter queue, left in place."""

    async def _handle(self, queue: str, handler: Handler, event: CloudEvent) -> str | None:
        """Run ``handler`` in the event's request context; the failure reason, or None."""
        token = request_id_var.set(event.requestid)
        started = time.perf_counter()
        try:
            await handler(event)
        except Exception as exc:
            log.warning(
                "handler failed",
                exc_info=True,
                extra={"queue": queue, "event_id": event.id, "event_type": event.type},
            )
            return f"{type(exc).__name__}: {exc}"[:2000]
        finally:
            labelled(BUS_HANDLER_DURATION, queue, event.type).observe(time.perf_counter() - started)
            request_id_var.reset(token)
        return None

    def _count(self, queue: str, event_type: str, outcome: str) -> None:
        labelled(BUS_CONSUMED, queue, event_type, outcome).inc()
        if outcome in ("dead_letter", "invalid"):
            BUS_DEAD_LETTERED.labels(queue, event_type).inc()
            log.error("event dead-lettered", extra={"queue": queue, "event_type": event_type})
