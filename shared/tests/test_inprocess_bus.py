"""What only the in-process bus does (the shared contract is in test_bus_contract): a close
that drains, no publishing after it; and the AMQP topic rules both adapters route by."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from c4c.shared.bus import BusOptions, CloudEvent, InProcessBus, PublishError, topic_matches


def event(type_: str, n: int) -> CloudEvent:
    return CloudEvent(source="/c4c/test", type=type_, data={"n": n})


async def test_close_drains_everything_published_including_retries(
    eventually: Callable[..., Any],
) -> None:
    bus = InProcessBus(BusOptions(prefetch=8, delivery_limit=3, retry_backoff=0.01))
    gate = asyncio.Event()
    attempts: Counter[int] = Counter()
    retrying: set[int] = set()
    handled: list[int] = []

    async def handler(received: CloudEvent) -> None:
        n = received.data["n"]
        attempts[n] += 1
        if received.type == "demo.flaky":
            if attempts[n] == 1:
                raise RuntimeError("first delivery fails")
            retrying.add(n)
            await gate.wait()  # the second delivery is still in hand when close begins
        handled.append(n)

    await bus.subscribe("demo", ["demo.*"], handler)
    await bus.start()
    kinds = ["demo.steady"] * 20 + ["demo.flaky"] * 5
    publishes = [asyncio.create_task(bus.publish(event(t, n))) for n, t in enumerate(kinds)]
    await eventually(lambda: len(retrying) == 5)
    closing = asyncio.create_task(bus.close(timeout=10))
    gate.set()
    await closing

    assert sorted(handled) == list(range(25))
    assert {n: attempts[n] for n in range(20, 25)} == dict.fromkeys(range(20, 25), 2)
    assert all(attempts[n] == 1 for n in range(20))
    assert await bus.dead_letters("demo") == []
    # Every publisher got its confirm: none was cut off by the close.
    await asyncio.gather(*publishes)


async def test_close_drains_events_published_by_handlers(eventually: Callable[..., Any]) -> None:
    bus = InProcessBus(BusOptions(prefetch=8))
    gate = asyncio.Event()
    waiting: list[int] = []
    seen: list[str] = []

    async def first(received: CloudEvent) -> None:
        waiting.append(received.data["n"])
        await gate.wait()  # publishes its follow-up only once close has begun
        seen.append(received.type)
        await bus.publish(event("demo.second", received.data["n"]))

    async def second(received: CloudEvent) -> None:
        seen.append(received.type)

    await bus.subscribe("first", ["demo.first"], first)
    await bus.subscribe("second", ["demo.second"], second)
    await bus.start()
    publishes = [asyncio.create_task(bus.publish(event("demo.first", n))) for n in range(5)]
    await eventually(lambda: len(waiting) == 5)
    closing = asyncio.create_task(bus.close(timeout=10))
    gate.set()
    await closing
    assert Counter(seen) == {"demo.first": 5, "demo.second": 5}
    assert await bus.dead_letters("first") == []
    await asyncio.gather(*publishes)


async def test_close_settles_events_that_end_dead_lettered() -> None:
    bus = InProcessBus(BusOptions(prefetch=1, delivery_limit=2, retry_backoff=0.01))

    async def always_fails(_: CloudEvent) -> None:
        raise ValueError("never")

    await bus.subscribe("demo", ["demo.#"], always_fails)
    await bus.start()
    await bus.publish(event("demo.doomed", 1))
    await bus.close(timeout=10)
    [dead] = await bus.dead_letters("demo")
    assert dead.attempts == 2
    assert dead.event.data == {"n": 1}
    assert "ValueError: never" in dead.reason


async def test_publish_after_close_raises() -> None:
    bus = InProcessBus()
    await bus.start()
    assert await bus.ping()
    await bus.close(timeout=1)
    assert not await bus.ping()
    with pytest.raises(PublishError):
        await bus.publish(event("demo.late", 1))


async def test_events_are_copies_not_shared_objects() -> None:
    bus = InProcessBus()
    got: list[CloudEvent] = []

    async def handler(received: CloudEvent) -> None:
        got.append(received)

    await bus.subscribe("demo", ["#"], handler)
    await bus.start()
    sent = CloudEvent(source="/c4c/test", type="demo.copy", data={"items": [1, 2]})
    await bus.publish(sent)
    await bus.close(timeout=5)
    [received] = got
    assert received == sent
    assert received is not sent
    assert received.data is not sent.data


async def test_an_encoded_event_travels_as_its_bytes() -> None:
    bus = InProcessBus(BusOptions(delivery_limit=1))

    async def refuse(received: CloudEvent) -> None:
        raise RuntimeError("parked at once, with the body it was delivered")

    await bus.subscribe("demo", ["demo.*"], refuse)
    await bus.start()
    # As an outbox row may hold it: not the key order nor the spacing CloudEvent writes.
    body = b'{"type": "demo.raw", "data": {"n": 1}, "id": "e1", "source": "/c4c/test"}'
    await bus.publish_encoded(body, event_id="e1", type="demo.raw", source="/c4c/test")
    await bus.close(timeout=5)
    [parked] = await bus.dead_letters("demo")
    assert parked.body == body


def recorder(seen: list[int]) -> Callable[[CloudEvent], Awaitable[None]]:
    async def handler(received: CloudEvent) -> None:
        seen.append(received.data["n"])

    return handler


async def test_a_queue_bound_after_a_type_was_routed_gets_the_next_ones() -> None:
    bus = InProcessBus()
    first: list[int] = []
    second: list[int] = []
    await bus.subscribe("first", ["demo.#"], recorder(first))
    await bus.start()
    await bus.publish(event("demo.routed", 1))
    await bus.subscribe("second", ["demo.routed"], recorder(second))
    await bus.publish(event("demo.routed", 2))
    await bus.close(timeout=5)
    assert first == [1, 2]
    assert second == [2]


# --- topic matching ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "key"),
    [
        ("a.b.c", "a.b.c"),
        ("a.*.c", "a.b.c"),
        ("*.b.*", "a.b.c"),
        ("*", "a"),
        ("#", "a"),
        ("#", "a.b.c"),
        ("#", ""),
        ("#.c", "c"),
        ("#.c", "a.b.c"),
        ("a.#", "a"),
        ("a.#", "a.b"),
        ("a.#", "a.b.c"),
        ("a.#.c", "a.c"),
        ("a.#.c", "a.b.c"),
        ("a.#.c", "a.b.x.c"),
        ("a.#.c.#", "a.c"),
        ("#.b.#", "b"),
        ("#.b.#", "a.b.c"),
        ("*.#", "a"),
        ("#.*", "a.b"),
        ("ingest.observation.*", "ingest.observation.created"),
    ],
)
def test_topic_matches(pattern: str, key: str) -> None:
    assert topic_matches(pattern, key)


@pytest.mark.parametrize(
    ("pattern", "key"),
    [
        ("a.b.c", "a.b"),
        ("a.b", "a.b.c"),
        ("a.*.c", "a.c"),
        ("a.*.c", "a.b.x.c"),
        ("*", "a.b"),
        ("*.*", "a"),
        ("a.#", "b"),
        ("a.#", "ab"),
        ("a.#", "ab.c"),
        ("#.c", "a.b"),
        ("#.c", "c.a"),
        ("a.#.c", "a.b"),
        ("a.#.c", "b.c"),
        ("a*", "ab"),
        ("ingest.*", "ingest"),
        ("ingest.observation.*", "quality.observation.created"),
    ],
)
def test_topic_does_not_match(pattern: str, key: str) -> None:
    assert not topic_matches(pattern, key)
