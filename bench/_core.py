"""What a suite gets (:class:`Context`), what it gives back (:class:`Result`), and how it says
that a service it needs is not there (:class:`ServiceUnavailable`)."""

from __future__ import annotations

import os
import statistics
import timeit
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/"


class ServiceUnavailable(Exception):
    """A service the suite needs (e.g. RabbitMQ) cannot be reached; the suite is skipped."""


def services_required() -> bool:
    """The same switch as the tests: with ``C4C_REQUIRE_SERVICES=1`` an absent service fails."""
    return os.environ.get("C4C_REQUIRE_SERVICES", "") not in ("", "0", "false")


@dataclass(frozen=True)
class Context:
    quick: bool = False
    broker_url: str = field(
        default_factory=lambda: os.environ.get(
            "C4C_BENCH_BROKER_URL",
            os.environ.get("C4C_TEST_BROKER_URL", DEFAULT_BROKER_URL),
        )
    )


@dataclass(frozen=True)
class Result:
    """One row of the report. ``ratio`` is ``value / baseline``; ``met`` says whether
    ``value >= min_ratio * baseline`` when the row has a target, else None."""

    suite: str
    metric: str
    value: float
    unit: str
    baseline: float | None = None
    target: str | None = None
    met: bool | None = None
    detail: str | None = None

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.baseline == 0:
            return None
        return self.value / self.baseline

    @classmethod
    def against(
        cls,
        suite: str,
        metric: str,
        value: float,
        unit: str,
        *,
        baseline: float,
        baseline_name: str,
        min_ratio: float | None = None,
        detail: str | None = None,
    ) -> Result:
        """A row compared with a same-run baseline; a target when ``min_ratio`` is given."""
        target = met = None
        if min_ratio is not None:
            target = f">= {min_ratio:g} x {baseline_name}"
            met = baseline > 0 and value / baseline >= min_ratio
        return cls(suite, metric, value, unit, baseline, target, met, detail)

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["ratio"] = self.ratio
        order = ["suite", "metric", "value", "unit", "baseline", "ratio", "target", "met"]
        return {key: row[key] for key in [*order, "detail"]}


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def cpu_check() -> float:
    """Microseconds a fixed pure-Python loop takes (best of five). The machines are shared
    and their speed drifts (seen: 16 to 25 µs within minutes): ratios to a same-run baseline
    hardly feel it, absolute figures (observations/s, seconds) do, so the report gives it."""
    number = 2000
    return min(timeit.repeat("sum(range(1000))", number=number, repeat=5)) / number * 1e6
