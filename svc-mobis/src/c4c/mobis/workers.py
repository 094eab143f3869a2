"""Work MOBIS does besides requests and events: pseudonymising the observations of deleted
accounts in ingest. It resumes after a restart (the pending ones are in the database) and
retries what failed (ingest unreachable) on its next round."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from c4c.mobis.service.observations import Observations
from c4c.shared.problems import ProblemError

log = logging.getLogger("c4c.mobis.workers")


class Pseudonymiser:
    def __init__(self, observations: Observations, *, interval: float = 30.0) -> None:
        self.observations = observations
        self.interval = interval
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="mobis-pseudonymiser")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                while await self.observations.pseudonymise_pending():
                    pass
            except (ProblemError, OSError):
                log.warning("pseudonymisation failed; retrying later", exc_info=True)
            except Exception:  # a bug must not end the worker for good
                log.exception("pseudonymisation failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
