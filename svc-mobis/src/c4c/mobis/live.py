"""Wake-ups for live streams: a consumer that stored a notification wakes the user's open
streams in this process at once. Streams also look at the database every few seconds, so a
notification stored by another replica reaches them too, a little later."""

from __future__ import annotations

import asyncio
from collections import defaultdict


class Notifier:
    def __init__(self) -> None:
        self._waiting: dict[str, set[asyncio.Event]] = defaultdict(set)

    def listen(self, user_id: str) -> asyncio.Event:
        event = asyncio.Event()
        self._waiting[user_id].add(event)
        return event

    def forget(self, user_id: str, event: asyncio.Event) -> None:
        waiting = self._waiting.get(user_id)
        if waiting is not None:
            waiting.discard(event)
            if not waiting:
                del self._waiting[user_id]

    def wake(self, user_id: str) -> None:
        for event in self._waiting.get(user_id, ()):
            event.set()
