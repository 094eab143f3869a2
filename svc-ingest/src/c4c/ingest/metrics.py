"""Prometheus metrics of the ingest service (names are a contract with deploy/'s dashboards
and alerts). ``project`` is the client-given ``datasetID``: past ``MAX_PROJECTS`` distinct
values the rest are counted as ``other``, so that no client can explode the label set."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable

from prometheus_client import Counter

from c4c.shared.metrics import labelled

MAX_PROJECTS = 500
OTHER = "other"
GRADES = frozenset({"casual", "needs_id", "research"})

OBSERVATIONS_CREATED = Counter(
    "c4c_ingest_observations_created",
    "Observations stored, by project (datasetID) and basisOfRecord.",
    ["project", "basis"],
)
OBSERVATIONS_SCORED = Counter(
    "c4c_ingest_observations_scored",
    "Quality scores written back onto observations, by project and grade.",
    ["project", "grade"],
)

_projects: set[str] = set()


def _project(project: str) -> str:
    if project in _projects:
        return project
    if len(_projects) < MAX_PROJECTS:
        _projects.add(project)
        return project
    return OTHER


def observations_created(projects_and_bases: Iterable[tuple[str, str]]) -> None:
    """Count stored observations, given as (project, basisOfRecord) pairs."""
    for (project, basis), count in Tally(projects_and_bases).items():
        labelled(OBSERVATIONS_CREATED, _project(project), basis).inc(count)


def observation_scored(project: str, grade: str | None) -> None:
    label = grade if grade in GRADES else (OTHER if grade else "none")
    labelled(OBSERVATIONS_SCORED, _project(project), label).inc()
