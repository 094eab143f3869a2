"""Prometheus metrics of the plantid service, counted for every identification whichever way
it came (``POST /v2/identify`` or an observation event). The ``project`` label is a project
that exists (bounded by the observatory's floras), or ``unknown`` for a request naming none.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from c4c.shared.metrics import labelled

UNKNOWN_PROJECT = "unknown"

IDENTIFICATIONS = Counter(
    "c4c_plantid_identifications",
    "Identifications by outcome: identified (a species), rejected (nothing close enough) or "
    "error (photos refused or unreachable, no gallery yet, unknown project).",
    ["project", "outcome"],
)
IDENTIFY_DURATION = Histogram(
    "c4c_plantid_identify_duration_seconds",
    "Time to identify one observation or request: decoding, inference and the gallery.",
    ["project"],
    buckets=(0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10),
)
MODEL_INFO = Gauge(
    "c4c_plantid_model_info", "The model identifying (value 1), by version.", ["model_version"]
)


def identified(project: str, *, rejected: bool, seconds: float) -> None:
    labelled(IDENTIFICATIONS, project, "rejected" if rejected else "identified").inc()
    labelled(IDENTIFY_DURATION, project).observe(seconds)


def failed(project: str) -> None:
    labelled(IDENTIFICATIONS, project, "error").inc()


def model_loaded(version: str) -> None:
    MODEL_INFO.clear()  # one model per process: a reload replaces the old version's series
    MODEL_INFO.labels(version).set(1)
