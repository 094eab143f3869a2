"""Fetching an observation's photos over HTTP, bounded in size and time."""

from __future__ import annotations

import httpx

from c4c.shared.problems import BodyTooLarge


class PhotoFetcher:
    def __init__(
        self, *, max_bytes: int, timeout: float, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.max_bytes = max_bytes
        self.client = httpx.AsyncClient(timeout=timeout, follow_redirects=True, transport=transport)

    async def __call__(self, url: str) -> bytes:
        """The bytes at ``url``; httpx errors propagate (the bus retries the event)."""
        async with self.client.stream("GET", url) as response:
            response.raise_for_status()
            data = bytearray()
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > self.max_bytes:
                    raise BodyTooLarge(f"{url} is larger than {self.max_bytes} bytes.")
            return bytes(data)

    async def close(self) -> None:
        await self.client.aclose()
