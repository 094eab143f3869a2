"""The ingest metrics of the contract, as ``/metrics`` prints them: observations created (single,
batch, retries not counted) and quality scores written back (redeliveries not counted)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from c4c.ingest import metrics
from c4c.shared.bus import new_event

API = "/ingest/v1"
Body = Callable[..., dict[str, Any]]


async def sample(client: httpx.AsyncClient, name: str, **labels: str) -> float:
    text = (await client.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return 0.0


async def test_created_counts_stored_observations_by_project_and_basis(
    client: httpx.AsyncClient, observation: Body
) -> None:
    project = f"metrics-{uuid.uuid4().hex[:8]}"
    name = "c4c_ingest_observations_created_total"
    human = {"project": project, "basis": "HumanObservation"}
    machine = {"project": project, "basis": "MachineObservation"}
    body = observation(id=str(uuid.uuid4()), datasetID=project)
    assert (await client.post(f"{API}/observations", json=body)).status_code == 201
    assert (await client.post(f"{API}/observations", json=body)).status_code == 201  # a retry
    batch = [observation(datasetID=project, basisOfRecord="MachineObservation")] * 3
    batch.append(body)  # a duplicate inside a batch
    batch.append(observation(datasetID=project, decimalLatitude=91))  # invalid
    response = await client.post(f"{API}/observations:batch", json=batch)
    assert response.json()["created"] == 3
    assert await sample(client, name, **human) == 1
    assert await sample(client, name, **machine) == 3


async def test_scored_counts_write_backs_once_by_grade(
    client: httpx.AsyncClient, observation: Body, app: Any, eventually: Any
) -> None:
    project = f"metrics-{uuid.uuid4().hex[:8]}"
    name = "c4c_ingest_observations_scored_total"
    body = observation(datasetID=project)
    obs_id = (await client.post(f"{API}/observations", json=body)).json()["id"]
    bus = app.state.runtime.bus
    scored = new_event(
        "quality",
        "observation.scored",
        {"observation_id": obs_id, "score": 88, "grade": "research", "flags": []},
    )
    unknown = new_event(
        "quality",
        "observation.scored",
        {"observation_id": str(uuid.uuid4()), "score": 10, "grade": "casual", "flags": []},
    )
    for event in (scored, scored, unknown):  # a redelivery, and an observation not here
        await bus.publish(event)

    async def counted() -> bool:
        return await sample(client, name, project=project, grade="research") == 1

    await eventually(counted)
    await bus.drain(10)
    assert await sample(client, name, project=project, grade="research") == 1
    assert await sample(client, name, project=project, grade="casual") == 0


def test_project_label_is_bounded(monkeypatch: Any) -> None:
    monkeypatch.setattr(metrics, "_projects", set())
    monkeypatch.setattr(metrics, "MAX_PROJECTS", 2)
    labels = [metrics._project(p) for p in ("a", "b", "c", "a", "d")]
    assert labels == ["a", "b", "other", "a", "other"]
