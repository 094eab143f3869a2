"""API keys: made, listed, revoked, and looked up per request — from a short-lived cache, so
that a busy key costs no query per request, and a revocation is seen within about
``cache_seconds``.

When a known key's entry goes stale, the first request starts one lookup and every request
goes on with the stale entry until it ends: a busy key never waits for the database, and
many requests arriving together never make as many queries."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from c4c.gateway import repository
from c4c.gateway.models import ApiKey
from c4c.shared.auth import ALL_SCOPES, hash_api_key, new_api_key
from c4c.shared.db import Database
from c4c.shared.problems import BadRequest

_SCOPE = re.compile(r"^(\*|[a-z0-9][a-z0-9._-]{0,63})$")
_CACHE_SIZE = 10_000


class InvalidScope(BadRequest):
    code, title = "invalid-scope", "Invalid scope"


@dataclass(frozen=True)
class KeyRecord:
    id: str
    name: str
    scopes: frozenset[str]
    daily_quota: int | None
    created_at: datetime
    revoked_at: datetime | None

    @classmethod
    def of(cls, row: ApiKey) -> KeyRecord:
        return cls(
            row.id,
            row.name,
            frozenset(row.scopes.split()),
            row.daily_quota,
            row.created_at,
            row.revoked_at,
        )


def parse_scopes(scopes: Iterable[str]) -> frozenset[str]:
    """Scopes are service names (``ingest``, ``plantid``…) or ``*`` for every service; commas
    and spaces both separate them."""
    parsed = frozenset(s for item in scopes for s in re.split(r"[,\s]+", item) if s)
    if not parsed:
        raise InvalidScope("Give at least one scope: a service name, or * for all.")
    for scope in parsed:
        if not _SCOPE.match(scope):
            raise InvalidScope(f"{scope!r} is not a scope: use a service name, or * for all.")
    return parsed


class ApiKeys:
    def __init__(
        self,
        db: Database,
        *,
        cache_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.cache_seconds = cache_seconds
        self.clock = clock
        # key hash → (record or None for unknown/revoked, fresh until)
        self._cache: dict[str, tuple[KeyRecord | None, float]] = {}
        self._lookups: dict[str, asyncio.Future[KeyRecord | None]] = {}

    async def create(
        self, name: str, scopes: Iterable[str], *, daily_quota: int | None = None
    ) -> tuple[KeyRecord, str]:
        """A new key and its secret, which is shown once and never stored."""
        secret = new_api_key()
        row = ApiKey(
            id=secrets.token_hex(6),
            name=name,
            key_hash=hash_api_key(secret),
            scopes=" ".join(sorted(parse_scopes(scopes))),
            daily_quota=daily_quota,
            created_at=datetime.now(UTC),
            revoked_at=None,
        )
        async with self.db.sessions() as session, session.begin():
            repository.add_key(session, row)
        return KeyRecord.of(row), secret

    async def create_development_key(self) -> str | None:
        """An all-scopes key when there is no key at all yet (a new installation)."""
        async with self.db.sessions() as session:
            if await repository.count_keys(session):
                return None
        _, secret = await self.create("development", [ALL_SCOPES])
        return secret

    async def list(self) -> list[KeyRecord]:
        async with self.db.sessions() as session:
            return [KeyRecord.of(row) for row in await repository.all_keys(session)]

    async def revoke(self, key_id: str) -> bool:
        async with self.db.sessions() as session, session.begin():
            revoked = await repository.revoke_key(session, key_id, datetime.now(UTC))
        self._cache.clear()
        return revoked

    async def authenticate(self, key: str) -> KeyRecord | None:
        """The active key with this secret, or None."""
        key_hash = hash_api_key(key)
        now = self.clock()
        cached = self._cache.get(key_hash)
        if cached is not None and cached[1] > now:
            return cached[0]
        lookup = self._lookups.get(key_hash)
        if lookup is None:
            lookup = self._lookups[key_hash] = asyncio.ensure_future(self._look_up(key_hash))
            lookup.add_done_callback(lambda done: self._looked_up(key_hash, done))
        if cached is not None and cached[0] is not None and now < cached[1] + self.cache_seconds:
            return cached[0]  # known a moment ago; the lookup refreshes it meanwhile
        # Shielded: a caller that goes away does not cancel the lookup others wait for.
        return await asyncio.shield(lookup)

    async def _look_up(self, key_hash: str) -> KeyRecord | None:
        async with self.db.sessions() as session:
            row = await repository.key_by_hash(session, key_hash)
        record = KeyRecord.of(row) if row is not None and row.revoked_at is None else None
        if len(self._cache) >= _CACHE_SIZE:  # bounded, even under a flood of made-up keys
            self._cache.pop(next(iter(self._cache)))
        self._cache[key_hash] = (record, self.clock() + self.cache_seconds)
        return record

    def _looked_up(self, key_hash: str, lookup: asyncio.Future[KeyRecord | None]) -> None:
        del self._lookups[key_hash]
        if not lookup.cancelled():
            lookup.exception()  # seen by whoever awaited it; a background refresh tries again
