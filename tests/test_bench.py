"""The benchmark harness end to end: ``python -m bench bus --quick`` against the real broker
writes a report with a row per adapter, each compared with the same-run baseline."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {"suite", "metric", "value", "unit", "baseline", "ratio", "target", "met"}


@pytest.mark.slow
@pytest.mark.rabbitmq
def test_bus_suite_reports_both_adapters_against_bare_aio_pika(
    broker_url: str, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "C4C_BENCH_BROKER_URL": broker_url,
        # The fixture found the broker: a skip inside the harness would be a bug here.
        "C4C_REQUIRE_SERVICES": "1",
    }
    run = subprocess.run(
        [sys.executable, "-m", "bench", "bus", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr

    report = (tmp_path / "results.md").read_text()
    assert re.search(r"bus: CPU check \d+\.\d µs before, \d+\.\d after", report), report
    rows = json.loads((tmp_path / "results.json").read_text())
    assert isinstance(rows, list)
    for row in rows:
        assert row.keys() >= FIELDS, row
        assert row["suite"] == "bus"
        assert isinstance(row["value"], float | int)
        assert row["value"] > 0, row
    by_metric = {row["metric"]: row for row in rows}

    bare = by_metric["bare aio-pika events/s"]
    assert bare["baseline"] is None
    assert bare["ratio"] is None
    for metric in ("rabbitmq events/s", "in-process events/s"):
        row = by_metric[metric]
        assert row["unit"] == "events/s"
        assert row["baseline"] == pytest.approx(bare["value"])
        assert row["ratio"] == pytest.approx(row["value"] / row["baseline"])
    rabbitmq = by_metric["rabbitmq events/s"]
    assert rabbitmq["target"] == ">= 0.8 x bare aio-pika"
    assert rabbitmq["met"] is (rabbitmq["ratio"] >= 0.8)

    markdown = (tmp_path / "results.md").read_text()
    assert "| Suite | Metric | Value | Unit | Baseline | Ratio | Target | Met |" in markdown
    for metric in ("bare aio-pika events/s", "rabbitmq events/s", "in-process events/s"):
        assert f"| bus | {metric} |" in markdown
    assert "| bus | rabbitmq events/s |" in run.stdout  # the table is printed too


def test_every_suite_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    """A suite is run by hand, not by CI: at least each must load (one imported a package
    the project no longer installs)."""
    monkeypatch.syspath_prepend(str(ROOT))  # bench/ is run from the checkout, not installed
    from bench.__main__ import available_suites, load

    suites = available_suites()
    assert "mobis" in suites
    for name in suites:
        assert callable(load(name).run), name
