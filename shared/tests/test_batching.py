"""Group commit: batches, per-item answers, one-by-one retry, claims, cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from sqlalchemy.exc import OperationalError

from c4c.shared.batching import GroupCommit


class Refused(Exception):
    pass


class Recorder:
    """``handle_many`` that records its batches; the first waits for ``release``."""

    def __init__(self, *, fail_with: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.writing = asyncio.Event()
        self.release = asyncio.Event()
        self.fail_with = fail_with

    async def handle_many(self, items: Sequence[int]) -> list[int | Exception]:
        self.batches.append(list(items))
        self.writing.set()
        await self.release.wait()
        if self.fail_with in items and len(items) > 1:
            raise RuntimeError("one bad item spoils its batch")
        return [Refused(f"no {i}") if i < 0 or i == self.fail_with else i * 10 for i in items]


async def test_items_coming_during_a_batch_go_together_in_the_next_each_with_its_answer() -> None:
    recorder = Recorder()
    groups = GroupCommit(recorder.handle_many, name="test")
    first = asyncio.create_task(groups.submit(1))
    await recorder.writing.wait()
    rest = [asyncio.create_task(groups.submit(i)) for i in (2, -3, 4)]
    await asyncio.sleep(0)  # one turn of the loop: the new tasks hand their items in
    recorder.release.set()
    assert await first == 10
    results = await asyncio.gather(*rest, return_exceptions=True)
    assert [str(r) for r in results] == ["20", "no -3", "40"]  # the refused one fails alone
    assert recorder.batches == [[1], [2, -3, 4]]


async def test_a_failing_batch_is_handled_again_item_by_item() -> None:
    recorder = Recorder(fail_with=3)
    recorder.release.set()
    groups = GroupCommit(recorder.handle_many, name="test")
    results = await asyncio.gather(*(groups.submit(i) for i in (2, 3, 4)), return_exceptions=True)
    assert [str(r) for r in results] == ["20", "no 3", "40"]
    assert recorder.batches == [[2, 3, 4], [2], [3], [4]]


async def test_items_claiming_one_key_never_share_a_batch() -> None:
    recorder = Recorder()
    recorder.release.set()
    groups = GroupCommit(recorder.handle_many, name="test", max_items=10, claims=lambda i: [i % 2])
    results = await asyncio.gather(*(groups.submit(i) for i in (1, 2, 3, 4, 6)))
    assert results == [10, 20, 30, 40, 60]
    # Odd and even claim one key each: one of each a batch, in arrival order.
    assert recorder.batches == [[1, 2], [3, 4], [6]]


async def test_a_batch_is_taken_once_its_oldest_item_lingered_or_it_is_full() -> None:
    recorder = Recorder()
    recorder.release.set()
    groups = GroupCommit(recorder.handle_many, name="test", linger=30.0, max_items=3)
    # A full batch goes at once: the test would wait half a minute otherwise.
    results = await asyncio.wait_for(
        asyncio.gather(*(groups.submit(i) for i in (1, 2, 3))), timeout=10
    )
    assert results == [10, 20, 30]
    assert recorder.batches == [[1, 2, 3]]


async def test_stopping_the_batches_cancels_every_waiting_caller() -> None:
    recorder = Recorder()
    groups = GroupCommit(recorder.handle_many, name="test")
    first = asyncio.create_task(groups.submit(1))
    await recorder.writing.wait()
    second = asyncio.create_task(groups.submit(2))
    await asyncio.sleep(0)
    worker = groups._worker
    assert worker is not None
    worker.cancel()
    for caller in (first, second):
        with pytest.raises(asyncio.CancelledError):
            await caller


async def test_a_batch_the_database_failed_fails_whole_not_item_by_item() -> None:
    calls: list[list[int]] = []

    async def handle_many(items: Sequence[int]) -> list[int | Exception]:
        calls.append(list(items))
        raise OperationalError("BEGIN", {}, Exception("database is locked"))

    groups = GroupCommit(handle_many, name="test")
    results = await asyncio.gather(*(groups.submit(i) for i in (1, 2, 3)), return_exceptions=True)
    assert all(isinstance(r, OperationalError) for r in results)
    assert calls == [[1, 2, 3]]  # item by item would only fail again, each after a wait
