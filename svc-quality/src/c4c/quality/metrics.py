"""Metrics of the quality service (names are a contract with deploy/ dashboards)."""

from prometheus_client import Counter, Histogram

ASSESSMENTS = Counter(
    "c4c_quality_assessments",
    "Observations assessed, by project and grade.",
    ["project", "grade"],
)
ASSESSMENT_DURATION = Histogram(
    "c4c_quality_assessment_duration_seconds",
    "Time to assess an observation: rules only (metadata) or with its photos (image).",
    ["kind"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
