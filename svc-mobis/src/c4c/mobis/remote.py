"""Ingest and plant identification as MOBIS sees them: their HTTP APIs, reached with
``runtime.clients`` (in process in embedded mode, by URL in distributed mode). The domain
(``service``) depends on the :class:`Ingest` and :class:`PlantId` ports only, so its tests
use fakes."""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from c4c.shared.auth import Principal
from c4c.shared.clients import ON_BEHALF_OF
from c4c.shared.problems import ProblemError

INGEST = "/ingest/v1"


class UpstreamFailed(ProblemError):
    status, code, title = 502, "upstream-failed", "A service MOBIS relies on failed"


class UpstreamRefused(ProblemError):
    """The other service refused what the app sent (its 4xx, passed on)."""

    status, code, title = 422, "upstream-refused", "Refused by the service MOBIS relies on"

    def __init__(self, detail: str, *, status: int, problem: dict[str, Any] | None) -> None:
        super().__init__(detail, problem=problem)
        self.status = status


@dataclass(frozen=True)
class PatchOutcome:
    """``observation`` after the change; ``stale``: the version given was not the server's
    (``observation`` is then the server's current one); ``gone``: deleted or unknown."""

    observation: dict[str, Any] | None
    stale: bool = False
    gone: bool = False


class Ingest(Protocol):
    async def create_batch(self, observations: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Ingest's per-item outcomes (``status`` created|duplicate|error, ``problem``)."""
        ...

    async def get(self, observation_id: str) -> dict[str, Any] | None: ...

    async def patch(
        self, observation_id: str, version: int, patch: dict[str, Any]
    ) -> PatchOutcome: ...

    async def upload_media(
        self,
        observation_id: str,
        media_id: str,
        content_type: str,
        size: int,
        content: bytes | AsyncIterable[bytes],
    ) -> dict[str, Any]: ...


class PlantId(Protocol):
    async def identify(
        self, project: str, photo: bytes, content_type: str, organ: str, *, user: str
    ) -> tuple[int, dict[str, Any]]:
        """(status, body) as plant identification answered ``user`` (an account id: its
        quota is charged)."""
        ...


def _problem(response: httpx.Response) -> dict[str, Any] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _failed(what: str, exc: Exception | httpx.Response) -> UpstreamFailed:
    if isinstance(exc, httpx.Response):
        return UpstreamFailed(f"{what} answered {exc.status_code}.")
    return UpstreamFailed(f"{what} is unreachable ({type(exc).__name__}).")


class IngestOverHttp:
    """Ingest's API: ``client`` is rooted at the ingest service."""

    def __init__(self, client: Callable[[], httpx.AsyncClient]) -> None:
        self._client = client

    async def _call(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._client().request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise _failed("The observation store", exc) from exc

    async def create_batch(self, observations: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        response = await self._call("POST", f"{INGEST}/observations:batch", json=list(observations))
        if response.status_code != 200:
            raise _failed("The observation store", response)
        items: list[dict[str, Any]] = response.json()["items"]
        return items

    async def get(self, observation_id: str) -> dict[str, Any] | None:
        response = await self._call("GET", f"{INGEST}/observations/{observation_id}")
        if response.status_code in (404, 410):
            return None
        if response.status_code != 200:
            raise _failed("The observation store", response)
        observation: dict[str, Any] = response.json()
        return observation

    async def patch(self, observation_id: str, version: int, patch: dict[str, Any]) -> PatchOutcome:
        response = await self._call(
            "PATCH",
            f"{INGEST}/observations/{observation_id}",
            json=patch,
            headers={
                "If-Match": f'"{version}"',
                "Content-Type": "application/merge-patch+json",
            },
        )
        if response.status_code == 200:
            return PatchOutcome(response.json())
        if response.status_code in (404, 410):
            return PatchOutcome(None, gone=True)
        if response.status_code == 412:
            current = await self.get(observation_id)
            return PatchOutcome(current, stale=current is not None, gone=current is None)
        if 400 <= response.status_code < 500:
            raise UpstreamRefused(
                "The observation store refused the change.",
                status=response.status_code,
                problem=_problem(response),
            )
        raise _failed("The observation store", response)

    async def upload_media(
        self,
        observation_id: str,
        media_id: str,
        content_type: str,
        size: int,
        content: bytes | AsyncIterable[bytes],
    ) -> dict[str, Any]:
        # A length, not chunked encoding: services refuse bodies without one (411). Bytes
        # (a photo in memory) go as one body, not streamed piece by piece.
        response = await self._call(
            "POST",
            f"{INGEST}/observations/{observation_id}/media",
            params={"mediaId": media_id},
            content=content,
            headers={"Content-Type": content_type, "Content-Length": str(size)},
        )
        if response.status_code in (200, 201):
            media: dict[str, Any] = response.json()
            return media
        if 400 <= response.status_code < 500:
            raise UpstreamRefused(
                "The observation store refused the media.",
                status=response.status_code,
                problem=_problem(response),
            )
        raise _failed("The observation store", response)


class PlantIdOverHttp:
    """Plant identification's Pl@ntNet-compatible API."""

    def __init__(self, client: Callable[[], httpx.AsyncClient]) -> None:
        self._client = client

    async def identify(
        self, project: str, photo: bytes, content_type: str, organ: str, *, user: str
    ) -> tuple[int, dict[str, Any]]:
        try:
            response = await self._client().post(
                f"/v2/identify/{project}",
                files={"images": ("photo", photo, content_type)},
                data={"organs": organ},
                params={"nb-results": 5},
                extensions={ON_BEHALF_OF: Principal("user", user)},
            )
        except httpx.HTTPError as exc:
            raise _failed("Plant identification", exc) from exc
        if response.status_code >= 500:
            raise _failed("Plant identification", response)
        return response.status_code, _problem(response) or {}
