"""The in-process bus: the broker's semantics inside one event loop, for embedded mode and
unit tests. Events are serialised on publish, as on the wire, so a handler never shares
objects with its publisher.

Nothing here survives the process, so the "confirm" is later than a broker's: ``publish``
returns once every bound queue has settled the event — handled, or parked as a dead letter
in a JSON-lines file under ``dead_letter_dir``. Until then the outbox keeps its row, and a
crash means the event is relayed again at the next start, never lost.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from c4c.shared.bus._events import CloudEvent
from c4c.shared.bus._port import BusOptions, DeadLetter, EventBus, Handler, PublishError
from c4c.shared.bus._topic import topic_matches
from c4c.shared.metrics import BUS_PUBLISHED, labelled

log = logging.getLogger("c4c.bus")

# Set in the bus's own worker tasks (a task's context is its own).
_handling: ContextVar[bool] = ContextVar("c4c_bus_handling", default=False)


@dataclass(eq=False)  # identity-hashed: the bus keeps the open ones in a set
class _Receipt:
    """One publish: settled when each queue it reached has acked or parked it."""

    unsettled: int
    done: asyncio.Future[None]

    def settle(self) -> None:
        self.unsettled -= 1
        if self.unsettled == 0 and not self.done.done():
            self.done.set_result(None)


@dataclass
class _Delivery:
    body: bytes
    event_type: str
    receipt: _Receipt
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
    def __init__(
        self, options: BusOptions | None = None, *, dead_letter_dir: Path | None = None
    ) -> None:
        super().__init__(options or BusOptions())
        self._dead_letter_dir = dead_letter_dir
        self._queues: dict[str, _Queue] = {}
        # The queues bound to each event type seen, so that a publish (the relay makes
        # thousands a second) matches no pattern; forgotten when a binding is added.
        self._routes: dict[str, list[_Queue]] = {}
        self._receipts: set[_Receipt] = set()
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
        await self.publish_encoded(
            event.to_json(), event_id=event.id, type=event.type, source=event.source
        )

    async def publish_encoded(self, body: bytes, *, event_id: str, type: str, source: str) -> None:
        if self._closing:
            raise PublishError("the bus is closing")
        targets = self._routes.get(type)
        if targets is None:
            targets = self._routes[type] = [
                q for q in self._queues.values() if any(topic_matches(p, type) for p in q.patterns)
            ]
        labelled(BUS_PUBLISHED, source, type).inc()
        if not targets:
            return  # like an exchange with no binding for it: nobody wants the event
        receipt = _Receipt(len(targets), asyncio.get_running_loop().create_future())
        self._receipts.add(receipt)
        for queue in targets:
            queue.unsettled += 1
            queue.ready.put_nowait(_Delivery(body, type, receipt))
        if _handling.get():
            # Published from inside a handler: waiting could deadlock on our own workers. The
            # event in hand stays unsettled until this handler returns, so a crash replays
            # that one, and its handler publishes this one again.
            self._receipts.discard(receipt)
            return
        try:
            await asyncio.shield(receipt.done)
        finally:
            self._receipts.discard(receipt)

    async def subscribe(self, queue: str, patterns: Sequence[str], handler: Handler) -> None:
        q = self._queues.setdefault(queue, _Queue(queue))
        q.patterns.update(patterns)
        self._routes.clear()
        q.handlers.append(handler)
        if self._started:
            self._spawn_workers(q, handler)

    async def ping(self) -> bool:
        return self._started and not self._closing

    async def dead_letters(self, queue: str) -> list[DeadLetter]:
        path = self._dead_letter_path(queue)
        if path is None:
            q = self._queues.get(queue)
            return list(q.dead) if q else []
        if not path.exists():
            return []
        text = await asyncio.to_thread(path.read_text, "utf-8")
        parked = []
        for line in text.splitlines():
            entry = json.loads(line)
            body = entry["event"].encode()
            parked.append(DeadLetter(queue, body, entry["reason"], entry["attempts"]))
        return parked

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
        for receipt in self._receipts:
            if not receipt.done.done():
                # The publisher keeps the event (its outbox row) and sends it again later.
                receipt.done.set_exception(PublishError("the bus closed before settling it"))
        self._started = False

    def _spawn_workers(self, queue: _Queue, handler: Handler) -> None:
        for _ in range(self.options.prefetch):
            task = asyncio.create_task(self._work(queue, handler), name=f"bus:{queue.name}")
            self._workers.add(task)
            task.add_done_callback(self._workers.discard)

    async def _work(self, queue: _Queue, handler: Handler) -> None:
        _handling.set(True)
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
            await self._settle(queue, delivery)
        elif delivery.attempt >= self.options.delivery_limit:
            await self._park(queue, delivery, reason, "dead_letter")
        else:
            self._count(queue.name, delivery.event_type, "retry")
            retry = _Delivery(
                delivery.body, delivery.event_type, delivery.receipt, delivery.attempt + 1
            )
            loop = asyncio.get_running_loop()
            timer: asyncio.TimerHandle

            def requeue() -> None:
                self._timers.discard(timer)
                queue.ready.put_nowait(retry)

            timer = loop.call_later(self.options.backoff(delivery.attempt), requeue)
            self._timers.add(timer)

    async def _park(self, queue: _Queue, delivery: _Delivery, reason: str, outcome: str) -> None:
        parked = DeadLetter(queue.name, delivery.body, reason, delivery.attempt)
        path = self._dead_letter_path(queue.name)
        if path is None:
            queue.dead.append(parked)
        else:
            await asyncio.to_thread(_append_durably, path, parked)
        self._count(queue.name, delivery.event_type, outcome)
        await self._settle(queue, delivery)

    async def _settle(self, queue: _Queue, delivery: _Delivery) -> None:
        delivery.receipt.settle()
        async with self._settled:
            queue.unsettled -= 1
            self._settled.notify_all()

    def _dead_letter_path(self, queue: str) -> Path | None:
        if self._dead_letter_dir is None:
            return None
        return self._dead_letter_dir / f"{queue}.jsonl"


def _append_durably(path: Path, parked: DeadLetter) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(
        {"event": parked.body.decode(), "reason": parked.reason, "attempts": parked.attempts}
    )
    with path.open("a", encoding="utf-8") as file:
        file.write(line + "\n")
        file.flush()
        os.fsync(file.fileno())
