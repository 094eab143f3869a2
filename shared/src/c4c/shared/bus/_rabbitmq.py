"""The RabbitMQ bus (aio-pika): one durable topic exchange, a durable quorum queue per
service with a delivery limit and a dead-letter queue, publisher confirms with a deadline,
manual acks, and a robust connection that restores channels, queues and consumers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, DeliveryError
from aio_pika.robust_channel import RobustChannel
from pydantic import ValidationError

from c4c.shared.bus._events import CLOUDEVENTS_MEDIA_TYPE, CloudEvent
from c4c.shared.bus._port import BusOptions, DeadLetter, EventBus, Handler, PublishError
from c4c.shared.metrics import BUS_PUBLISH_FAILURES, BUS_PUBLISHED, BUS_RECONNECTS, labelled

log = logging.getLogger("c4c.bus")

REASON_HEADER = "x-c4c-failure-reason"
ATTEMPTS_HEADER = "x-c4c-attempts"


def dead_letter_queue(queue: str) -> str:
    return f"{queue}.dlq"


@dataclass
class _Subscription:
    queue: str
    patterns: tuple[str, ...]
    handler: Handler
    # Strong references: aio-pika restores only the channels and queues still alive.
    channel: AbstractChannel | None = None
    amqp_queue: AbstractQueue | None = None
    consumer_tag: str | None = None


class RabbitMQBus(EventBus):
    def __init__(self, url: str, options: BusOptions | None = None, *, name: str = "c4c") -> None:
        super().__init__(options or BusOptions())
        self._url = url
        self._name = name
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._dead_letter_exchange: AbstractExchange | None = None
        self._subscriptions: list[_Subscription] = []
        self._in_hand: set[asyncio.Task[Any]] = set()
        self._reconnects = 0

    @property
    def reconnects(self) -> int:
        """How often the connection was lost and restored since start."""
        return self._reconnects

    def _on_reconnect(self, *_: Any) -> None:
        self._reconnects += 1
        BUS_RECONNECTS.labels(self._name).inc()
        log.warning("broker connection restored", extra={"connection": self._name})

    @property
    def dead_letter_exchange_name(self) -> str:
        return f"{self.options.exchange}.dlx"

    async def start(self) -> None:
        self._connection = await aio_pika.connect_robust(
            self._url, client_properties={"connection_name": self._name}
        )
        self._connection.reconnect_callbacks.add(self._on_reconnect)
        self._channel = await self._connection.channel(publisher_confirms=True)
        self._exchange = await self._channel.declare_exchange(
            self.options.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        self._dead_letter_exchange = await self._channel.declare_exchange(
            self.dead_letter_exchange_name, aio_pika.ExchangeType.DIRECT, durable=True
        )
        for subscription in self._subscriptions:
            await self._consume(subscription)

    async def subscribe(self, queue: str, patterns: Sequence[str], handler: Handler) -> None:
        subscription = _Subscription(queue, tuple(patterns), handler)
        self._subscriptions.append(subscription)
        if self._connection is not None:
            await self._consume(subscription)

    async def _consume(self, sub: _Subscription) -> None:
        assert self._connection is not None
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=self.options.prefetch)
        exchange = await channel.declare_exchange(
            self.options.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        dlx = await channel.declare_exchange(
            self.dead_letter_exchange_name, aio_pika.ExchangeType.DIRECT, durable=True
        )
        parked = await channel.declare_queue(
            dead_letter_queue(sub.queue), durable=True, arguments={"x-queue-type": "quorum"}
        )
        await parked.bind(dlx, routing_key=sub.queue)
        queue = await channel.declare_queue(
            sub.queue,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                # The broker's own limit is the backstop for a consumer that dies on a message
                # before it can park it; ours parks it one delivery earlier, with the reason.
                "x-delivery-limit": self.options.delivery_limit,
                "x-dead-letter-exchange": self.dead_letter_exchange_name,
                "x-dead-letter-routing-key": sub.queue,
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            },
        )
        for pattern in sub.patterns:
            await queue.bind(exchange, routing_key=pattern)

        async def on_message(message: AbstractIncomingMessage) -> None:
            task = asyncio.current_task()
            if task is not None:
                self._in_hand.add(task)
            try:
                await self._on_message(sub, message)
            finally:
                if task is not None:
                    self._in_hand.discard(task)

        sub.channel, sub.amqp_queue = channel, queue
        sub.consumer_tag = await queue.consume(on_message, no_ack=False)

    async def _on_message(self, sub: _Subscription, message: AbstractIncomingMessage) -> None:
        headers = message.headers or {}
        delivery_count = headers.get("x-delivery-count", 0)
        attempt = (delivery_count if isinstance(delivery_count, int) else 0) + 1
        try:
            event = CloudEvent.from_json(message.body)
        except ValidationError as exc:
            await self._park(sub.queue, message, f"not a CloudEvent: {exc}", attempt, "invalid")
            return
        reason = await self._handle(sub.queue, sub.handler, event)
        if reason is None:
            self._count(sub.queue, event.type, "ack")
            await self._settle(message.ack())
        elif attempt >= self.options.delivery_limit:
            await self._park(sub.queue, message, reason, attempt, "dead_letter")
        else:
            self._count(sub.queue, event.type, "retry")
            await asyncio.sleep(self.options.backoff(attempt))
            await self._settle(message.nack(requeue=True))

    async def _park(
        self,
        queue: str,
        message: AbstractIncomingMessage,
        reason: str,
        attempts: int,
        outcome: str,
    ) -> None:
        """Copy the message, with why, to the dead-letter queue; then let go of it."""
        assert self._dead_letter_exchange is not None
        parked = aio_pika.Message(
            message.body,
            headers={**(message.headers or {}), REASON_HEADER: reason, ATTEMPTS_HEADER: attempts},
            message_id=message.message_id,
            content_type=message.content_type,
            type=message.type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        try:
            await self._dead_letter_exchange.publish(
                parked, routing_key=queue, mandatory=False, timeout=self.options.publish_timeout
            )
        except (*CONNECTION_EXCEPTIONS, TimeoutError):
            log.warning("could not park a message; it will be redelivered", exc_info=True)
            await self._settle(message.nack(requeue=True))
            return
        self._count(queue, message.type or "?", outcome)
        await self._settle(message.ack())

    @staticmethod
    async def _settle(settlement: Any) -> None:
        # An ack on a channel that died with the connection cannot land; the broker
        # redelivers the message, and idempotent consumers make that harmless.
        try:
            await settlement
        except CONNECTION_EXCEPTIONS:
            log.info("ack or nack lost with its channel; the broker will redeliver")

    async def publish(self, event: CloudEvent) -> None:
        await self.publish_encoded(
            event.to_json(), event_id=event.id, type=event.type, source=event.source
        )

    async def publish_encoded(self, body: bytes, *, event_id: str, type: str, source: str) -> None:
        exchange, channel = self._exchange, self._channel
        if exchange is None or not isinstance(channel, RobustChannel):
            raise PublishError("the bus is not started")
        # Only what AMQP tools need to route and inspect; the rest is in the CloudEvent body.
        message = aio_pika.Message(
            body,
            message_id=event_id,
            content_type=CLOUDEVENTS_MEDIA_TYPE,
            type=type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.publish_timeout
        delay = 0.05
        while True:
            try:
                await exchange.publish(
                    message,
                    routing_key=type,
                    mandatory=False,
                    timeout=max(deadline - loop.time(), 0.001),
                )
            except (*CONNECTION_EXCEPTIONS, DeliveryError, TimeoutError) as exc:
                if loop.time() + delay >= deadline:
                    labelled(BUS_PUBLISH_FAILURES, source, type).inc()
                    raise PublishError(f"event {event_id} not confirmed: {exc!r}") from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                # A robust channel reopens in the background; wait for it, within the deadline.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(deadline - loop.time(), 0)):
                        await channel.ready()
                continue
            labelled(BUS_PUBLISHED, source, type).inc()
            return

    async def ping(self) -> bool:
        connection = self._connection
        return connection is not None and not connection.is_closed and connection.connected.is_set()

    async def dead_letters(self, queue: str) -> list[DeadLetter]:
        if self._connection is None:
            raise RuntimeError("the bus is not started")
        channel = await self._connection.channel()
        try:
            parked = await channel.declare_queue(dead_letter_queue(queue), passive=True)
            found = []
            while (message := await parked.get(no_ack=False, fail=False)) is not None:
                headers = message.headers or {}
                reason = headers.get(REASON_HEADER)
                if reason is None:  # parked by the broker's own delivery limit
                    reason = "the broker's delivery limit was reached"
                attempts = headers.get(ATTEMPTS_HEADER, 0)
                found.append(
                    DeadLetter(
                        queue,
                        message.body,
                        str(reason),
                        attempts if isinstance(attempts, int) else 0,
                    )
                )
            return found
        finally:
            # Closing the channel returns every message we looked at to the queue.
            await channel.close()

    async def close(self, timeout: float = 30.0) -> None:
        for sub in self._subscriptions:
            if sub.amqp_queue is not None and sub.consumer_tag is not None:
                try:
                    await sub.amqp_queue.cancel(sub.consumer_tag)
                except CONNECTION_EXCEPTIONS:
                    log.info("consumer already gone", extra={"queue": sub.queue})
        if self._in_hand:
            _, pending = await asyncio.wait(set(self._in_hand), timeout=timeout)
            if pending:
                log.error("closing with handlers still running", extra={"count": len(pending)})
        if self._connection is not None:
            await self._connection.close()
        self._connection = self._channel = self._exchange = None
        self._dead_letter_exchange = None
