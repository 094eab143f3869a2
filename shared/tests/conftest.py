"""Fixtures for the shared library's tests."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aio_pika
import pytest

from c4c.shared.bus import RabbitMQBus
from c4c.shared.bus._rabbitmq import dead_letter_queue

Cleanup = Callable[[RabbitMQBus], Awaitable[None]]


@pytest.fixture
def remove_from_broker(broker_url: str) -> Cleanup:
    """Closes a test's RabbitMQ bus and deletes what it declared: queues, dead-letter queues
    and exchanges, so tests leave the broker as they found it."""

    async def remove(bus: RabbitMQBus) -> None:
        queues = {s.queue for s in bus._subscriptions}
        await bus.close(timeout=5)
        connection = await aio_pika.connect(broker_url)
        async with connection:
            channel = await connection.channel()
            for queue in queues:
                await channel.queue_delete(queue)
                await channel.queue_delete(dead_letter_queue(queue))
            await channel.exchange_delete(bus.options.exchange)
            await channel.exchange_delete(bus.dead_letter_exchange_name)

    return remove
