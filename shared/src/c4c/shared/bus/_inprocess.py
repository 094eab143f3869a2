"""The in-process bus: the broker's semantics inside one event loop, for embedded mode and
unit tests. Events are serialised on publish, as on the wire, so a handler never shares
objects with its publisher. They live in memory: what the outbox relay has handed over is
delivered before a clean shutdown (``close`` drains), not across a crash of the process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydantic import ValidationError

from c4c.shared.bus._events import CloudEvent
from c4c.shared.bus._port import BusOptions, DeadLetter, EventBus, Handler, PublishError
from c4c.shared.bus._topic import topic_matches
from c4c.shared.metrics import BUS_PUBLISHED

log = logging.getLogger("c4c.bus")


@dataclass
class _Delivery:
    body: bytes
    event_type: str
    attempt: int = 1


@dataclass
class _Queue:
    name: str
    patterns: set[str] = field(default_factory=set)
    ready: asyncio.Queue[_Delivery] = field(default_factory=asyncio.Queue)
    handlers: list[Handler] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    # Published or retrying but not yet acked or dead-lettered: what a drain waits for.
    unsettled: int = 0


class InProcessBus(EventBus):
    def __init__(self, options: BusOptions | None = None) -> None:
        super().__init__(options or BusOptions())
        self._queues: dict[str, _Queue] = {}
        self._workers: set[asyncio.Task[None]] = set()
        self._timers: set[asyncio.TimerHandle] = set()
        self._settled = asyncio.Condition()
        self._started = False
        self._closing = False

    async def start(self) -> None:
        self._started = True
        for queue in self._queues.values():
            for handler in queue.handlers:
                self._spawn_workers(queue, handler)

    async def publish(self, event: CloudEvent) -> None:
        if self._closing:
            raise PublishError("the bus is closing")
        body = event.to_json()
        for queue in self._queues.values():
            if any(topic_matches(p, event.type) for p in queue.patterns):
                queue.unsettled += 1
                queue.ready.put_nowait(_Delivery(body, event.type))
        BUS_PUBLISHED.labels(event.source, event.type).inc()

    async def subscribe(self, queue: str, patterns: Sequence[str], handler: Handler) -> None:
        q = self._queues.setdefault(queue, _Queue(queue))
        q.patterns.update(patterns)
        q.handlers.append(handler)
        if self._started:
            self._spawn_workers(q, handler)

    async def ping(self) -> bool:
        return self._started and not self._closing

    async def dead_letters(self, queue: str) -> list[DeadLetter]:
        q = self._queues.get(queue)
        return list(q.dead) if q else []

    async def drain(self, timeout: float) -> bool:
        """Wait until every published event is settled; False if ``timeout`` ran out."""
        async with self._settled:
            try:
                await asyncio.wait_for(
                    self._settled.wait_for(
                        lambda: all(q.unsettled == 0 for q in self._queues.values())
                    ),
                    timeout,
                )
            except TimeoutError:
                return False
        return True

    async def close(self, timeout: float = 30.0) -> None:
        if not await self.drain(timeout):
            left = {q.name: q.unsettled for q in self._queues.values() if q.unsettled}
            log.error("bus closed before draining", extra={"unsettled": left})
        self._closing = True
        for timer in self._timers:
            timer.cancel()
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()
        self._started = False

    def _spawn_workers(self, queue: _Queue, handler: Handler) -> None:
        for _ in range(self.options.prefetch):
            task = asyncio.create_task(self._work(queue, handler), name=f"bus:{queue.name}")
            self._workers.add(task)
            task.add_done_callback(self._workers.discard)

    async def _work(self, queue: _Queue, handler: Handler) -> None:
        while True:
            delivery = await queue.ready.get()
            await self._deliver(queue, handler, delivery)

    async def _deliver(self, queue: _Queue, handler: Handler, delivery: _Delivery) -> None:
        try:
            event = CloudEvent.from_json(delivery.body)
        except ValidationError as exc:
            await self._park(queue, delivery, f"not a CloudEvent: {exc}", "invalid")
            return
        reason = await self._handle(queue.name, handler, event)
        if reason is None:
            self._count(queue.name, delivery.event_type, "ack")
            await self._settle(queue)
        elif delivery.attempt >= self.options.delivery_limit:
            await self._park(queue, delivery, reason, "dead_letter")
        else:
            self._count(queue.name, delivery.event_type, "retry")
            retry = _Delivery(delivery.body, delivery.event_type, delivery.attempt + 1)
            loop = asyncio.get_running_loop()
            timer: asyncio.TimerHandle

            def requeue() -> None:
                self._timers.discard(timer)
                queue.ready.put_nowait(retry)

            timer = loop.call_later(self.options.backoff(delivery.attempt), requeue)
            self._timers.add(timer)

    async def _park(self, queue: _Queue, delivery: _Delivery, reason: str, outcome: str) -> None:
        queue.dead.append(DeadLetter(queue.name, delivery.body, reason, delivery.attempt))
        self._count(queue.name, delivery.event_type, outcome)
        await self._settle(queue)

    async def _settle(self, queue: _Queue) -> None:
        async with self._settled:
            queue.unsettled -= 1
            self._settled.notify_all()
