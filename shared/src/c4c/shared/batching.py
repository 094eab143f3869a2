"""Group commit: what concurrent callers hand in while a batch is being written goes together
in the next batch, so a burst costs about one transaction, while an item alone waits for
nobody. Used for events handled in batches, single creates, media rows, upload marks."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from typing import Generic, TypeVar

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

log = logging.getLogger("c4c.batching")

NOT_AN_ITEMS_FAULT = (OperationalError, PoolTimeout, InterfaceError, ConnectionError, TimeoutError)
"""Failures of the database or the network, not of an item: the whole batch fails with them
(each caller gets the error), for item by item would only fail again, each after a wait."""

T = TypeVar("T")
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    """Items handed in by concurrent callers (:meth:`submit`), handled in batches by
    ``handle_many``, which answers one result per item, in order (an ``Exception`` for an
    item it refused: that caller gets it raised).

    A batch is taken ``linger`` seconds after its oldest item came (at once if already
    full), and whatever arrives while a batch is handled forms the next. A batch
    that raises is handled again item by item, so no item fails for another's, unless what
    failed was the database or the network (``NOT_AN_ITEMS_FAULT``). Items that share a key of
    ``claims`` (say, a client's id: one INSERT could not tell which of two won) never go in
    one batch; the later waits for the next. Batches run in a task of their own: a caller
    that goes away does not cancel the others' work (its own item is still handled); if that
    task is cancelled, every caller still waiting is cancelled too."""

    def __init__(
        self,
        handle_many: Callable[[Sequence[T]], Awaitable[Sequence[R | Exception]]],
        *,
        name: str,
        linger: float = 0.0,
        max_items: int = 100,
        claims: Callable[[T], Iterable[Hashable]] | None = None,
    ) -> None:
        self.handle_many = handle_many
        self.name = name
        self.linger = linger
        self.max_items = max_items
        self.claims = claims
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._first_came = 0.0  # loop time the oldest pending item came at
        self._worker: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[R] = loop.create_future()
        if not self._pending:
            self._first_came = loop.time()
        self._pending.append((item, done))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain(), name=self.name)
        return await done

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        batch: list[tuple[T, asyncio.Future[R]]] = []
        try:
            while self._pending:
                # No item waits more than ``linger`` after it came for its batch to be taken.
                wait = self._first_came + self.linger - loop.time()
                if wait > 0 and len(self._pending) < self.max_items:
                    await asyncio.sleep(wait)
                batch = self._take()
                self._first_came = 0.0  # those left over have waited already
                await self._handle(batch)
                batch = []
        finally:  # cancelled: nobody waits for good
            for _, done in batch + self._pending:
                done.cancel()

    def _take(self) -> list[tuple[T, asyncio.Future[R]]]:
        """The pending items in arrival order, up to ``max_items``, no two claiming a key."""
        if self.claims is None:
            batch, self._pending = self._pending[: self.max_items], self._pending[self.max_items :]
            return batch
        batch, waiting = [], []
        claimed: set[Hashable] = set()
        for entry in self._pending:
            keys = set(self.claims(entry[0]))
            if len(batch) >= self.max_items or keys & claimed:
                waiting.append(entry)
                continue
            claimed |= keys
            batch.append(entry)
        self._pending = waiting
        return batch

    async def _handle(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self.handle_many([item for item, _ in batch])
        except Exception as exc:
            if len(batch) == 1 or isinstance(exc, NOT_AN_ITEMS_FAULT):
                for _, done in batch:
                    _settle(done, exc)
                return
            log.warning(
                "a batch failed; handling its items one by one",
                extra={"batch": self.name},
                exc_info=True,
            )
            for entry in batch:
                await self._handle([entry])
            return
        for (_, done), result in zip(batch, results, strict=True):
            _settle(done, result)


def _settle(done: asyncio.Future[R], result: R | Exception) -> None:
    if done.done():  # its caller was cancelled meanwhile
        return
    if isinstance(result, Exception):
        done.set_exception(result)
    else:
        done.set_result(result)
