"""The broker drops every connection while 1,000 events are in flight: none is lost, and the
consumer carries on without a restart."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable

import pytest

from c4c.shared.bus import BusOptions, CloudEvent, RabbitMQBus, new_event

pytestmark = pytest.mark.rabbitmq

TOTAL = 1000


async def close_all_connections() -> None:
    """Have the broker itself close every client connection, as a restart or a network
    failure would."""
    rabbitmqctl = shutil.which("rabbitmqctl")
    if rabbitmqctl is None:
        pytest.fail("rabbitmqctl is needed to drop connections from the broker side")
    process = await asyncio.create_subprocess_exec(
        rabbitmqctl,
        "close_all_connections",
        "resilience test",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await process.communicate()
    assert process.returncode == 0, err.decode()


@pytest.fixture
async def bus(
    broker_url: str, unique_name: Callable[[str], str], remove_from_broker
) -> AsyncIterator[RabbitMQBus]:
    exchange = unique_name("events")
    bus = RabbitMQBus(
        broker_url,
        BusOptions(
            exchange=exchange,
            prefetch=50,
            delivery_limit=20,
            publish_timeout=30.0,
            retry_backoff=0.01,
        ),
        name="resilience-test",
    )
    yield bus
    await remove_from_broker(bus)


@pytest.mark.slow
async def test_no_event_lost_when_broker_closes_connections(
    bus: RabbitMQBus, unique_name: Callable[[str], str], eventually
) -> None:
    received: set[str] = set()
    deliveries = 0

    async def handler(event: CloudEvent) -> None:
        nonlocal deliveries
        deliveries += 1
        await asyncio.sleep(0.001)  # a handler does some work; keeps events in flight
        received.add(event.id)

    await bus.subscribe(unique_name("q"), ["chaos.tick"], handler)
    await bus.start()
    events = [new_event("test", "chaos.tick", {"n": n}) for n in range(TOTAL)]
    published = 0

    async def publish_all() -> None:
        # Paced over ~4 s, so that both drops (rabbitmqctl takes ~1 s) land mid-stream.
        nonlocal published
        for start in range(0, TOTAL, 25):
            await asyncio.gather(*(bus.publish(e) for e in events[start : start + 25]))
            published = start + 25
            await asyncio.sleep(0.1)

    publisher = asyncio.create_task(publish_all())
    # Drop the connections twice: once mid-publish, once while the consumer is still busy.
    await eventually(lambda: published >= TOTAL * 0.3, timeout=30)
    await close_all_connections()
    await eventually(lambda: bus.reconnects >= 1, timeout=30)
    assert not publisher.done(), "the first drop should have hit mid-publish"
    await eventually(lambda: len(received) >= TOTAL * 0.6, timeout=60)
    await close_all_connections()
    await eventually(lambda: bus.reconnects >= 2, timeout=30)
    await publisher

    await eventually(lambda: len(received) == TOTAL, timeout=60, interval=0.05)
    assert received == {e.id for e in events}
    assert deliveries >= TOTAL  # redeliveries are allowed, losses are not
    assert await bus.ping()
