"""How the service's parts meet: the outbox as the service's event sink, one
:class:`IngestService` per unit of work (a request's session, or a consumer's), and
:class:`Creations`, which writes concurrent single creates together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from c4c.ingest.repository import Repository
from c4c.ingest.schemas import ObservationCreate
from c4c.ingest.service import Created, IngestService
from c4c.ingest.settings import IngestSettings
from c4c.shared.app import ServiceRuntime
from c4c.shared.storage import MediaStorage

log = logging.getLogger("c4c.ingest.creations")


class OutboxSink:
    """Events written into the session's transaction; the relay sends them once committed."""

    def __init__(self, runtime: ServiceRuntime, session: AsyncSession) -> None:
        self.runtime = runtime
        self.session = session

    async def emit(self, type: str, items: Iterable[tuple[str, dict[str, Any]]]) -> None:
        await self.runtime.outbox.add_batch(self.session, type, items)


class Parts:
    """What every unit of work needs, made once per app."""

    def __init__(
        self, runtime: ServiceRuntime, settings: IngestSettings, storage: MediaStorage
    ) -> None:
        self.runtime = runtime
        self.settings = settings
        self.storage = storage

    @contextlib.asynccontextmanager
    async def unit(self) -> AsyncIterator[IngestService]:
        """A service in a short transaction of its own, committed on exit."""
        async with self.runtime.db.sessions() as session, session.begin():
            yield self.service(session)

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[IngestService]:
        """A service in a read-only transaction: on SQLite it reads beside the one writer
        instead of queueing for it (see ``Database.readers``)."""
        async with self.runtime.db.readers() as session, session.begin():
            yield self.service(session)

    def service(self, session: AsyncSession) -> IngestService:
        repo = Repository(session)
        return IngestService(repo, OutboxSink(self.runtime, session), self.settings, self.storage)


@dataclass(frozen=True)
class _Request:
    model: ObservationCreate
    idempotency_key: str | None
    answer: asyncio.Future[Created | None]

    @property
    def claims(self) -> tuple[str | None, str | None]:
        return (str(self.model.id) if self.model.id else None, self.idempotency_key)


class Creations:
    """Single creates written together (group commit): while one transaction commits, the
    requests arriving meanwhile queue and go in the next, so a burst costs one transaction,
    one statement per table and one relay pass, not one each; alone, a request waits for
    nobody. Each request is answered once its row and event are committed, as before. A
    failing group is retried one request at a time, so no request fails for another's row.
    The writes run in their own task: a client that goes away does not cancel its
    neighbours' (its own row is stored; its retry is answered as a replay)."""

    def __init__(self, parts: Parts, *, max_items: int) -> None:
        self.parts = parts
        self.max_items = max_items
        self._queue: list[_Request] = []
        self._writer: asyncio.Task[None] | None = None

    async def create(self, model: ObservationCreate, idempotency_key: str | None) -> Created:
        answer: asyncio.Future[Created | None] = asyncio.get_running_loop().create_future()
        self._queue.append(_Request(model, idempotency_key, answer))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_queued(), name="ingest:creations")
        created = await answer
        if created is not None:
            return created
        async with self.parts.runtime.db.sessions() as session, session.begin():
            return await self.parts.service(session).replay(model, idempotency_key)

    async def _write_queued(self) -> None:
        try:
            while self._queue:
                await self._write(self._next_group())
        finally:  # cancelled (shutdown): nobody waits forever
            for request in self._queue:
                request.answer.cancel()

    def _next_group(self) -> list[_Request]:
        """Queued requests in arrival order, up to ``max_items``, no two claiming the same id
        or key (one INSERT could not tell which of them won): those wait for the next."""
        group: list[_Request] = []
        claimed: set[tuple[int, str]] = set()
        waiting: list[_Request] = []
        for request in self._queue:
            claims = {(n, c) for n, c in enumerate(request.claims) if c is not None}
            if len(group) >= self.max_items or claims & claimed:
                waiting.append(request)
                continue
            claimed |= claims
            group.append(request)
        self._queue = waiting
        return group

    async def _write(self, group: list[_Request]) -> None:
        try:
            async with self.parts.runtime.db.sessions() as session, session.begin():
                service = self.parts.service(session)
                results = await service.create_many([(r.model, r.idempotency_key) for r in group])
        except asyncio.CancelledError:
            for request in group:
                request.answer.cancel()
            raise
        except Exception as exc:
            if len(group) > 1:
                log.warning("group of creates failed; writing them one by one", exc_info=True)
                for request in group:
                    await self._write([request])
                return
            _answer(group[0].answer, exception=exc)
            return
        for request, result in zip(group, results, strict=True):
            _answer(request.answer, result=result)


def _answer(
    answer: asyncio.Future[Created | None],
    *,
    result: Created | None = None,
    exception: BaseException | None = None,
) -> None:
    if answer.done():  # the request was cancelled: its client went away
        return
    if exception is not None:
        answer.set_exception(exception)
    else:
        answer.set_result(result)
