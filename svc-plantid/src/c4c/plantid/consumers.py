"""Bus handlers: an observation with photos → ``observation.identified``.

An observation is identified when it is created with photos (``observation.created``) and
again whenever photos are added to it (``observation.updated`` whose ``changed`` holds image
media: mobile apps create the observation first and upload its photos after). Then all its
photos count, so the observation is read back from ingest. Other updates (an identification
written back, a corrected date) are ignored. It is identified when it has image media with
URLs and its ``datasetID`` names a plantid project (else the ``default_project`` setting,
when set). The photos are fetched and identified before the transaction opens (no lock held
during inference); the result and its event are then written once per event id
(``idempotent``), through the outbox.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from sqlalchemy.ext.asyncio import AsyncSession

from c4c.plantid import metrics
from c4c.plantid.errors import EmptyGallery
from c4c.plantid.models import IdentificationRow
from c4c.plantid.repository import Repository
from c4c.plantid.service import Engine, Fetch, Identifier, IdentifyOutcome
from c4c.plantid.settings import PlantidSettings
from c4c.shared.app import Consumers, ServiceRuntime
from c4c.shared.bus import CloudEvent
from c4c.shared.clients import FetchFailed
from c4c.shared.inbox import idempotent
from c4c.shared.problems import ProblemError

log = logging.getLogger("c4c.plantid.consumers")

IDENTIFIED = "observation.identified"
MAX_PHOTOS = 5
_IMAGE_KINDS = frozenset({"image", "stillimage", "photo"})


def photo_urls(data: dict[str, Any]) -> list[str]:
    urls = []
    for media in data.get("media") or []:
        if not isinstance(media, dict):
            continue
        kind = str(media.get("type") or "image").lower()
        fmt = str(media.get("format") or "image/").lower()
        if kind in _IMAGE_KINDS and fmt.startswith("image/") and media.get("url"):
            urls.append(str(media["url"]))
    return urls[:MAX_PHOTOS]


def identified_event_data(observation_id: str, outcome: IdentifyOutcome) -> dict[str, Any]:
    return {
        "observation_id": observation_id,
        "project": outcome.project,
        "rejected": outcome.rejected,
        "candidates": []
        if outcome.rejected
        else [
            {
                "scientificName": r.candidate.species,
                "score": round(r.candidate.score, 5),
                "taxonRank": (r.species.taxon_rank if r.species else None),
                "family": (r.species.family if r.species else None),
                "gbifId": (r.species.gbif_id if r.species else None),
            }
            for r in outcome.ranked
        ],
        "best_similarity": round(outcome.identification.best_similarity, 4),
        "model_version": outcome.model_version,
        "gallery_version": outcome.gallery_version,
    }


def plantid_consumers(
    runtime: ServiceRuntime, engine: Engine, settings: PlantidSettings, fetch: Fetch
) -> Consumers:
    identifier = Identifier(runtime.db.sessions, engine, settings)

    async def identify(event: CloudEvent, observation: dict[str, Any]) -> None:
        observation_id = str(observation.get("id") or "")
        urls = photo_urls(observation)
        if not observation_id or not urls:
            return
        dataset = str(observation.get("datasetID") or "")
        if "\x00" in observation_id + dataset:  # no database stores it: not worth the photos
            log.info("observation id or dataset not storable; not identified")
            return
        async with runtime.db.sessions() as session, session.begin():
            if dataset and await Repository(session).get_project(dataset) is not None:
                project = dataset
            elif settings.default_project:
                project = settings.default_project
            else:
                return
        try:
            photos = [await fetch(url) for url in urls]
        except ProblemError as exc:
            metrics.failed(project)
            if isinstance(exc, FetchFailed) and exc.retryable:
                raise  # the bus tries the event again later
            log.info("observation photos not fetched", extra={"detail": exc.detail})
            return
        try:
            outcome, _ = await identifier.identify(project, photos, ["auto"] * len(photos))
        except EmptyGallery:
            log.info("no gallery yet; observation not identified", extra={"project": project})
            return
        except ProblemError as exc:  # photos that are not images: nothing to identify
            log.info("observation photos refused", extra={"detail": exc.detail})
            return
        body = identified_event_data(observation_id, outcome)

        async def record(session: AsyncSession, _: CloudEvent) -> None:
            await Repository(session).add_identification(
                IdentificationRow(
                    id=str(uuid.uuid4()),
                    project_id=project,
                    observation_id=observation_id,
                    model_version=outcome.model_version,
                    gallery_version=outcome.gallery_version,
                    rejected=outcome.rejected,
                    result=body,
                    created_at=datetime.now(UTC),
                )
            )
            runtime.outbox.add(
                session, runtime.event(IDENTIFIED, body, subject=f"observation/{observation_id}")
            )

        await idempotent(runtime.db, "plantid.identify", record, service=runtime.service)(event)

    async def on_created(event: CloudEvent) -> None:
        await identify(event, event.data if isinstance(event.data, dict) else {})

    async def on_updated(event: CloudEvent) -> None:
        data = event.data if isinstance(event.data, dict) else {}
        changed = data.get("changed")
        if not isinstance(changed, dict) or not photo_urls({"media": changed.get("media")}):
            return  # no photo added: the identification still holds
        observation = await read_observation(runtime, str(data.get("id") or ""))
        if observation is not None:
            await identify(event, observation)

    return {"observation.created": on_created, "observation.updated": on_updated}


async def read_observation(runtime: ServiceRuntime, observation_id: str) -> dict[str, Any] | None:
    """The observation as ingest serves it now (with all its photos); None when it is gone.
    Other failures raise, so that the bus tries the event again."""
    if not observation_id:
        return None
    client = runtime.clients.client("ingest")
    response = await client.get(f"/ingest/v1/observations/{quote(observation_id, safe='')}")
    if response.status_code in (404, 410):
        return None
    response.raise_for_status()
    body = response.json()
    return body if isinstance(body, dict) else None
