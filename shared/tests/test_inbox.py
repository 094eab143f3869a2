"""The batch consumer: events trickling in share a batch when it lingers."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from c4c.shared.bus import CloudEvent, new_event
from c4c.shared.inbox import Batcher


async def _batch_sizes(linger: float, events: int, spacing: float) -> list[int]:
    """Hand ``events`` to a batcher ``spacing`` seconds apart; the sizes of its batches."""
    sizes: list[int] = []

    async def handle_many(batch: Sequence[CloudEvent]) -> None:
        sizes.append(len(batch))

    batcher = Batcher(handle_many, linger=linger)

    async def later(index: int) -> None:
        await asyncio.sleep(spacing * index)  # one after another, as an upload's events come
        await batcher.handle(new_event("test", "thing.happened", {"n": index}))

    await asyncio.gather(*(later(n) for n in range(events)))
    return sizes


async def test_events_trickling_in_wait_for_each_other_in_one_batch() -> None:
    assert await _batch_sizes(linger=1.0, events=10, spacing=0.01) == [10]


async def test_without_linger_the_first_event_is_handled_alone_at_once() -> None:
    sizes = await _batch_sizes(linger=0.0, events=10, spacing=0.01)
    assert sizes[0] == 1
    assert sum(sizes) == 10


async def test_a_failed_batch_is_retried_event_by_event_without_lingering() -> None:
    handled: list[list[int]] = []

    async def handle_many(batch: Sequence[CloudEvent]) -> None:
        numbers = [event.data["n"] for event in batch]
        handled.append(numbers)
        if 3 in numbers:
            raise ValueError("a bad event")

    batcher = Batcher(handle_many, linger=0.2)
    events = [new_event("test", "thing.happened", {"n": n}) for n in range(5)]
    loop = asyncio.get_running_loop()
    started = loop.time()
    outcomes = await asyncio.gather(*(batcher.handle(e) for e in events), return_exceptions=True)
    assert [isinstance(o, ValueError) for o in outcomes] == [False, False, False, True, False]
    assert handled == [[0, 1, 2, 3, 4], [0], [1], [2], [3], [4]]
    # One linger for the batch, none for the retries (five of them would take a second).
    assert loop.time() - started < 0.2 * 5
    assert str(outcomes[3]) == "a bad event"


async def test_events_that_came_during_a_batch_wait_no_longer_than_the_linger() -> None:
    """What arrives while a slow batch is handled is taken as soon as it is over: it has
    waited its linger already."""
    release, started = asyncio.Event(), asyncio.Event()
    taken: list[tuple[list[int], float]] = []
    loop = asyncio.get_running_loop()

    async def handle_many(batch: Sequence[CloudEvent]) -> None:
        taken.append(([event.data["n"] for event in batch], loop.time()))
        if len(taken) == 1:
            started.set()
            await release.wait()

    batcher = Batcher(handle_many, linger=0.3)
    first = asyncio.create_task(batcher.handle(new_event("test", "thing.happened", {"n": 0})))
    await started.wait()  # the first batch is being handled
    later = asyncio.create_task(batcher.handle(new_event("test", "thing.happened", {"n": 1})))
    await asyncio.sleep(0.4)  # longer than the linger, while the first batch still runs
    released = loop.time()
    release.set()
    await asyncio.gather(first, later)
    assert [numbers for numbers, _ in taken] == [[0], [1]]
    assert taken[1][1] - released < 0.3  # taken at once, not after another linger
