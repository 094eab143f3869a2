"""How the service's parts meet: the outbox as the service's event sink, one
:class:`IngestService` per unit of work (a request's session, or a consumer's), and
:class:`Creations`, which writes concurrent single creates together."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from c4c.ingest.repository import Repository
from c4c.ingest.schemas import ObservationCreate
from c4c.ingest.service import Created, IngestService
from c4c.ingest.settings import IngestSettings
from c4c.shared.app import ServiceRuntime
from c4c.shared.batching import GroupCommit
from c4c.shared.storage import MediaStorage


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


Creation = tuple[ObservationCreate, str | None, str]
"""A single create: the observation, its Idempotency-Key if any, and its creator."""


def _claims(creation: Creation) -> list[tuple[int, str]]:
    """The client's id and key: two creates claiming one never go in one INSERT (it could
    not tell which of them won)."""
    model, key, _ = creation
    return [(n, c) for n, c in enumerate((str(model.id) if model.id else None, key)) if c]


class Creations:
    """Single creates written together (a :class:`~c4c.shared.batching.GroupCommit`): while
    one transaction commits, the requests arriving meanwhile queue and go in the next, so a
    burst costs one transaction, one statement per table and one relay pass, not one each;
    alone, a request waits for nobody. Each request is answered once its row and event are
    committed; a failing group is retried one request at a time, so no request fails for
    another's row; a client that goes away does not cancel its neighbours' writes (its own
    row is stored; its retry is answered as a replay)."""

    def __init__(self, parts: Parts, *, max_items: int) -> None:
        self.parts = parts
        self._groups = GroupCommit(
            self._write, name="ingest:creations", max_items=max_items, claims=_claims
        )

    async def create(
        self, model: ObservationCreate, idempotency_key: str | None, creator: str
    ) -> Created:
        created = await self._groups.submit((model, idempotency_key, creator))
        if created is not None:
            return created
        async with self.parts.runtime.db.sessions() as session, session.begin():
            return await self.parts.service(session).replay(model, idempotency_key, creator)

    async def _write(self, group: Sequence[Creation]) -> list[Created | None]:
        async with self.parts.runtime.db.sessions() as session, session.begin():
            return await self.parts.service(session).create_many(group)
