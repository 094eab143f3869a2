"""How the service's parts meet, made once per app: the signing key, the ports to ingest
and plant identification, the OpenID Connect provider if configured, units of work,
live-stream wake-ups, background work (pseudonymisation, settling reservations, pruning
refresh tokens)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from sqlalchemy.ext.asyncio import AsyncSession

from c4c.mobis.keys import Signer
from c4c.mobis.live import Notifier
from c4c.mobis.oidc import OidcProvider
from c4c.mobis.remote import Ingest, IngestOverHttp, PlantId, PlantIdOverHttp
from c4c.mobis.repository import Repository
from c4c.mobis.service.accounts import Accounts, Passwords
from c4c.mobis.service.observations import Observations
from c4c.mobis.service.oidc import OidcLogins
from c4c.mobis.settings import MobisSettings
from c4c.shared.app import ServiceRuntime


class Parts:
    def __init__(
        self,
        runtime: ServiceRuntime,
        settings: MobisSettings,
        *,
        ingest: Ingest | None = None,
        plantid: PlantId | None = None,
    ) -> None:
        self.runtime = runtime
        self.settings = settings
        self.signer = Signer.from_settings(settings)
        self.passwords = Passwords(settings)
        self.notifier = Notifier()
        self.ingest = ingest or IngestOverHttp(lambda: runtime.clients.client("ingest"))
        self.plantid = plantid or PlantIdOverHttp(lambda: runtime.clients.client("plantid"))
        self.observations = Observations(self.unit, self.reads, self.ingest, settings)
        # Deleted accounts' observations pseudonymised in ingest; woken by a deletion.
        self.pseudonymise_now = runtime.add_periodic(
            "pseudonymisation", self.observations.pseudonymise_pending, interval=30.0
        )
        runtime.add_periodic("refresh-token-pruning", self._prune_refresh_tokens, interval=3600.0)
        runtime.add_periodic(
            "reservation-settling",
            self.observations.settle_reservations,
            interval=settings.reservation_settle_seconds,
        )
        provider = OidcProvider.from_settings(settings)
        self.oidc: OidcLogins | None = None
        if provider is not None:
            runtime.add_closer(provider.aclose)
            self.oidc = OidcLogins(provider, self.unit, self._accounts_in, settings)

    @contextlib.asynccontextmanager
    async def unit(self) -> AsyncIterator[Repository]:
        async with self.runtime.db.sessions() as session, session.begin():
            yield Repository(session)

    @contextlib.asynccontextmanager
    async def reads(self) -> AsyncIterator[Repository]:
        """A read-only unit: on SQLite a deferred transaction on the read pool, which takes
        no write lock (a write transaction takes it up front), so reads wait for no writer
        and no writer waits for them."""
        async with self.runtime.db.readers() as session, session.begin():
            yield Repository(session)

    async def _prune_refresh_tokens(self) -> bool:
        async with self.unit() as repo:
            return await self._accounts_in(repo).prune_refresh_tokens()

    def accounts(self, session: AsyncSession) -> Accounts:
        return self._accounts_in(Repository(session))

    def _accounts_in(self, repo: Repository) -> Accounts:
        return Accounts(repo, self.signer, self.passwords, self.settings)
