"""The monitoring of deploy/ against the running suite: the gateway and the five services
started on loopback by ``deploy/local`` (honcho, RabbitMQ, PostgreSQL), and a real Prometheus
server with ``deploy/prometheus`` adapted to loopback targets. Every target is up, every
alert rule evaluates without error, and every metric the dashboards and rules use is one
that the code emits (read from each component's live ``/metrics``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from c4c.shared.testing import LocalRun, free_ports

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPONENTS = ("gateway", "ingest", "quality", "video", "plantid", "mobis")
PREFIXES = {
    "ingest": ("/ingest",),
    "quality": ("/quality",),
    "video": ("/video",),
    "plantid": ("/plantid", "/v2"),
    "mobis": ("/mobis",),
}
RABBITMQ_METRICS = "127.0.0.1:15692"  # the broker's prometheus plugin, when enabled
START_TIMEOUT = 90.0
# PromQL words that are not metric names.
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
# Series Prometheus makes itself rather than scraping them.
SYNTHETIC_SERIES = {"up"}


def listening(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with contextlib.suppress(OSError), socket.create_connection((host, int(port)), 1):
        return True
    return False


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana query) selects."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values may contain anything
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # range selectors ($__rate_interval too)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    tokens = re.findall(r"(?<![\w$.])([a-zA-Z_:][\w:]*)\b(?!\s*\()", expr)
    return {token for token in tokens if token.lower() not in PROMQL_WORDS}


def deploy_expressions() -> dict[str, str]:
    """Every PromQL expression of the alert rules and dashboards, by where it is."""
    found: dict[str, str] = {}
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            found[f"alerts.yml:{rule['alert']}"] = rule["expr"]
    for path in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                found[f"{path.name}:{panel['title']}:{target['refId']}"] = target["expr"]
    return found


def series_names(exposition: str) -> set[str]:
    """The series names a /metrics page can have, families without samples yet included
    (a labelled metric prints only its HELP and TYPE until it is first used)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
        "info": ("_info",),
    }
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def test_metric_names_are_read_from_promql() -> None:
    expr = (
        'sum by (route, le) (rate(c4c_a_bucket{route!~"/v{2}"}[$__rate_interval])) / '
        "on (x) group_left(y) max(up offset 5m) and bool c4c_b"
    )
    assert metric_names(expr) == {"c4c_a_bucket", "up", "c4c_b"}


@dataclass
class Running:
    ports: dict[str, int]
    prometheus_url: str
    rabbitmq_scraped: bool
    honcho: subprocess.Popen[bytes]
    prometheus: subprocess.Popen[bytes]
    logs: Path

    def check_alive(self) -> None:
        for name, process in (("honcho", self.honcho), ("prometheus", self.prometheus)):
            if process.poll() is not None:
                log = (self.logs / f"{name}.log").read_text(errors="replace")
                pytest.fail(f"{name} exited with {process.returncode}:\n{log[-4000:]}")


def loopback_config(ports: dict[str, int], scrape_rabbitmq: bool) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with its targets on loopback, scraping and evaluating
    every second so that the test does not wait long."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    jobs = []
    for job in config["scrape_configs"]:
        if job["job_name"] == "rabbitmq":
            if not scrape_rabbitmq:
                continue
            for static in job["static_configs"]:
                static["targets"] = [RABBITMQ_METRICS]
        else:
            for static in job["static_configs"]:
                static["targets"] = [f"127.0.0.1:{ports[static['labels']['component']]}"]
        jobs.append(job)
    config["scrape_configs"] = jobs
    return config


def env_file(values: dict[str, str]) -> str:
    return "".join(f"{key}={shlex.quote(value)}\n" for key, value in values.items())


@pytest.fixture(scope="module")
def tools() -> None:
    subprocess.run([DEPLOY / "tools" / "ensure-tools"], check=True, timeout=600)


@pytest.fixture(scope="module")
def running(
    tools: None, broker_url: str, postgres_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("deploy")
    run = LocalRun(PREFIXES, broker_url, postgres_url, tmp / "data")
    (prometheus_port,) = free_ports(1)
    ports = run.ports
    # deploy/local/distributed.env, made unique to this run (ports, schemas, exchange, queues).
    environment = {k: v for k, v in run.environment().items() if k.startswith("C4C_")}
    (tmp / "distributed.env").write_text(env_file(environment))

    scrape_rabbitmq = listening(RABBITMQ_METRICS)
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(loopback_config(ports, scrape_rabbitmq)))
    (tmp / "alerts.yml").write_text((DEPLOY / "prometheus" / "alerts.yml").read_text())

    inherited = {k: v for k, v in os.environ.items() if not k.startswith("C4C_")}
    with (
        (tmp / "honcho.log").open("wb") as honcho_log,
        (tmp / "prometheus.log").open("wb") as prometheus_log,
    ):
        honcho = subprocess.Popen(
            [
                ROOT / ".venv" / "bin" / "honcho",
                "--procfile",
                DEPLOY / "local" / "Procfile",
                "--env",
                tmp / "distributed.env",
                "--app-root",
                ROOT,
                "start",
            ],
            cwd=ROOT,
            env=inherited,
            stdout=honcho_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, to stop it and its children
        )
        prometheus = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
            ],
            stdout=prometheus_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield Running(
            ports=ports,
            prometheus_url=f"http://127.0.0.1:{prometheus_port}",
            rabbitmq_scraped=scrape_rabbitmq,
            honcho=honcho,
            prometheus=prometheus,
            logs=tmp,
        )
    finally:
        for process in (prometheus, honcho):
            stop(process)
        asyncio.run(run.forget())


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


class PrometheusStarting(Exception):
    """Prometheus answers 503 until it has loaded its storage and configuration."""


async def prometheus_api(running: Running, path: str) -> Any:
    async with httpx.AsyncClient(base_url=running.prometheus_url, timeout=5) as client:
        answer = await client.get(f"/api/v1/{path}")
    if answer.status_code == 503:
        raise PrometheusStarting(answer.text)
    answer.raise_for_status()
    body = answer.json()
    assert body["status"] == "success", body
    return body["data"]


@pytest.mark.slow
@pytest.mark.rabbitmq
@pytest.mark.postgres
async def test_prometheus_scrapes_every_component_up(
    running: Running, eventually: Callable[..., Any]
) -> None:
    targets: list[dict[str, Any]] = []

    async def all_up() -> bool:
        nonlocal targets
        running.check_alive()
        with contextlib.suppress(httpx.TransportError, PrometheusStarting):
            targets = (await prometheus_api(running, "targets"))["activeTargets"]
        return bool(targets) and all(t["health"] == "up" for t in targets)

    with contextlib.suppress(pytest.fail.Exception):
        await eventually(all_up, timeout=START_TIMEOUT, interval=0.5)
    health = {t["labels"]["component"]: (t["health"], t["lastError"]) for t in targets}
    expected = set(COMPONENTS) | ({"rabbitmq"} if running.rabbitmq_scraped else set())
    assert set(health) == expected
    assert all(state == "up" for state, _ in health.values()), health


@pytest.mark.slow
@pytest.mark.rabbitmq
@pytest.mark.postgres
async def test_every_alert_rule_evaluates_without_error(
    running: Running, eventually: Callable[..., Any]
) -> None:
    rules: list[dict[str, Any]] = []

    async def all_evaluated() -> bool:
        nonlocal rules
        running.check_alive()
        with contextlib.suppress(httpx.TransportError, PrometheusStarting):
            groups = (await prometheus_api(running, "rules"))["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
        return bool(rules) and all(rule["health"] != "unknown" for rule in rules)

    await eventually(all_evaluated, timeout=START_TIMEOUT, interval=0.5)
    deployed = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    names = {rule["alert"] for group in deployed["groups"] for rule in group["rules"]}
    assert {rule["name"] for rule in rules} == names
    errors = {rule["name"]: rule.get("lastError") for rule in rules if rule["health"] != "ok"}
    assert not errors
    # Nothing is wrong with a suite that just started: no alert fires.
    assert [rule["name"] for rule in rules if rule["state"] == "firing"] == []


async def emitted_series(running: Running, eventually: Callable[..., Any]) -> set[str]:
    """Every series name the running components (and the broker, when scraped) can emit."""
    pages: dict[str, str] = {}

    async def every_component_scraped() -> bool:
        running.check_alive()
        async with httpx.AsyncClient(timeout=5) as client:
            for name, port in running.ports.items():
                if name not in pages:
                    with contextlib.suppress(httpx.TransportError):
                        answer = await client.get(f"http://127.0.0.1:{port}/metrics")
                        if answer.status_code == 200:
                            pages[name] = answer.text
        return pages.keys() == running.ports.keys()

    await eventually(every_component_scraped, timeout=START_TIMEOUT, interval=0.5)
    emitted = SYNTHETIC_SERIES.union(*(series_names(page) for page in pages.values()))
    if running.rabbitmq_scraped:
        async with httpx.AsyncClient(timeout=5) as client:
            answer = await client.get(
                f"http://{RABBITMQ_METRICS}/metrics/detailed",
                params=[("family", "queue_coarse_metrics"), ("family", "queue_consumer_count")],
            )
        emitted |= series_names(answer.text)
    return emitted


def used_series(running: Running) -> dict[str, set[str]]:
    """The series names each dashboard query and alert rule uses; RabbitMQ's only when the
    broker's plugin can be scraped here."""
    used = {}
    for where, expr in deploy_expressions().items():
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        if not running.rabbitmq_scraped:
            names = {n for n in names if not n.startswith("rabbitmq_")}
        used[where] = names
    return used


@pytest.mark.slow
@pytest.mark.rabbitmq
@pytest.mark.postgres
async def test_dashboards_and_rules_use_only_metrics_the_code_emits(
    running: Running, eventually: Callable[..., Any]
) -> None:
    emitted = await emitted_series(running, eventually)
    unknown = {
        where: missing
        for where, names in used_series(running).items()
        if (missing := names - emitted)
    }
    assert not unknown, "used but not emitted:\n" + "\n".join(
        f"  {where}: {sorted(names)}" for where, names in sorted(unknown.items())
    )
