"""The report: ``results.json`` (a list of rows) and ``results.md`` (the same as a table)."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from bench._core import Result

COLUMNS = ["Suite", "Metric", "Value", "Unit", "Baseline", "Ratio", "Target", "Met"]


def fmt(number: float | None) -> str:
    if number is None:
        return "—"
    if abs(number) >= 100:
        return f"{number:,.0f}"
    if abs(number) >= 1:
        return f"{number:.2f}"
    return f"{number:.3g}"


def _met(met: bool | None) -> str:
    return "—" if met is None else ("✓" if met else "✗")


def table(results: Sequence[Result]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        cells = [
            r.suite,
            r.metric,
            fmt(r.value),
            r.unit,
            fmt(r.baseline),
            "—" if r.ratio is None else f"{r.ratio:.2f}",
            r.target or "—",
            _met(r.met),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(results: Sequence[Result], notes: Sequence[str], *, quick: bool) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"Python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.machine()}"
    parts = [
        "# Benchmark results",
        "",
        f"{when}; {machine}; {'quick' if quick else 'full'} workload.",
        "Baselines are measured in the same run; ratio = value / baseline.",
        "",
        table(results),
        "",
    ]
    details = [f"- **{r.suite} / {r.metric}**: {r.detail}" for r in results if r.detail]
    if details:
        parts += ["## Details", "", *details, ""]
    if notes:
        parts += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(parts)


def write(out: Path, results: Sequence[Result], notes: Sequence[str], *, quick: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = [r.to_dict() for r in results]
    (out / "results.json").write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
    (out / "results.md").write_text(markdown(results, notes, quick=quick))
