"""deploy/ checked with the real tools: promtool on the Prometheus config and alert rules,
Compose on compose.yaml (and the Compose specification's schema), kustomize on the
Kubernetes overlay and the Kubernetes schemas on what it renders, the Grafana provisioning,
the runbook and the PostgreSQL init script against a real server. The tools are installed by
``deploy/tools/ensure-tools`` when missing."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
GRAFANA = DEPLOY / "grafana"
DASHBOARD_UIDS = {"c4c-overview", "c4c-bus", "c4c-video", "c4c-identification", "c4c-data"}
COMPONENTS = ("gateway", "ingest", "quality", "video", "plantid", "mobis")
# Every issue-listed alert, by what it watches.
REQUIRED_ALERTS = {
    "C4CServiceDown",
    "C4CHighErrorRatio",
    "C4CHighLatency",
    "C4CQueueBacklog",
    "C4CDeadLettersGrowing",
    "C4COutboxBacklog",
    "C4CVideoStreamLag",
    "C4CIdentificationSlow",
}


@pytest.fixture(scope="module", autouse=True)
def tools() -> None:
    subprocess.run([DEPLOY / "tools" / "ensure-tools"], check=True, timeout=600)


def run(*command: str | Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        **kwargs,
    )
    assert result.returncode == 0, f"{command}:\n{result.stdout}\n{result.stderr}"
    return result


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboards() -> dict[str, dict[str, Any]]:
    return {
        path.name: json.loads(path.read_text())
        for path in sorted((GRAFANA / "dashboards").glob("*.json"))
    }


def test_promtool_accepts_the_config_and_the_rules() -> None:
    run("promtool", "check", "config", DEPLOY / "prometheus" / "prometheus.yml")
    run("promtool", "check", "rules", DEPLOY / "prometheus" / "alerts.yml")


def test_every_alert_has_a_summary_and_a_runbook_entry() -> None:
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} >= REQUIRED_ALERTS
    runbook = (DEPLOY / "RUNBOOK.md").read_text()
    headings = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in runbook.splitlines()
        if line.startswith("## ")
    }
    for rule in rules:
        annotations = rule["annotations"]
        assert annotations["summary"].strip(), rule["alert"]
        assert annotations["runbook"] == f"deploy/RUNBOOK.md#{rule['alert'].lower()}"
        assert rule["alert"].lower() in headings, f"no '## {rule['alert']}' in RUNBOOK.md"
        assert rule["labels"]["severity"] in {"critical", "warning"}


def compose_command() -> list[str]:
    """``docker compose`` where the v2 plugin is installed, else Debian's docker-compose."""
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, check=False, timeout=30
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    return ["docker-compose"]


def test_compose_file_validates() -> None:
    compose = DEPLOY / "compose.yaml"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("C4C_", "POSTGRES_"))}
    rendered = run(
        *compose_command(),
        "--env-file",
        DEPLOY / ".env.example",
        "-f",
        compose,
        "config",
        env=env,
    ).stdout
    services = yaml.safe_load(rendered)["services"]
    assert set(COMPONENTS) <= services.keys()
    assert {"postgres", "rabbitmq", "prometheus", "grafana"} <= services.keys()
    for name in COMPONENTS:
        environment = services[name]["environment"]
        assert environment["C4C_DATABASE_URL"].endswith(f"@postgres:5432/{name}")
        assert environment["C4C_BROKER_URL"].startswith("amqp://")
        assert json.loads(environment["C4C_SERVICE_URLS"]).keys() == set(COMPONENTS)
        assert any(
            v.endswith(":/app/data:rw") or v.endswith(":/app/data")
            for v in _volumes(services[name])
        )
    upstreams = json.loads(services["gateway"]["environment"]["C4C_GATEWAY_UPSTREAMS"])
    assert set(upstreams) == {"/ingest", "/quality", "/video", "/plantid", "/v2", "/mobis"}
    # Secrets have no defaults: without an .env file Compose refuses to start.
    refused = subprocess.run(
        [*compose_command(), "--env-file", os.devnull, "-f", str(compose), "config"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env=env,
        cwd=ROOT,
    )
    assert refused.returncode != 0
    # And the file follows the Compose specification (what Compose v2 reads).
    run(
        sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", compose
    )


def _volumes(service: dict[str, Any]) -> list[str]:
    """Compose v1 prints short volume strings, v2 long mappings: both as ``source:target``."""
    return [
        v if isinstance(v, str) else f"{v.get('source')}:{v['target']}"
        for v in service.get("volumes", [])
    ]


@pytest.fixture(scope="module")
def kubernetes_manifests(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    rendered = run("kubectl", "kustomize", DEPLOY / "kubernetes" / "overlays" / "example").stdout
    path = tmp_path_factory.mktemp("kustomize") / "rendered.yaml"
    path.write_text(rendered)
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


def test_kubernetes_overlay_renders_and_validates_against_the_schemas(
    kubernetes_manifests: list[dict[str, Any]], tmp_path: Path
) -> None:
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(kubernetes_manifests))
    result = run(
        sys.executable, "-m", "kubernetes_validate", "--strict", "--no-warn", "-k", "1.30.0", path
    )
    assert "failed" not in result.stdout.lower(), result.stdout
    validated = result.stdout.count("passed for resource")
    assert validated == len(kubernetes_manifests), result.stdout


def test_kubernetes_workloads_have_probes_limits_budgets_and_autoscalers(
    kubernetes_manifests: list[dict[str, Any]],
) -> None:
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for doc in kubernetes_manifests:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    assert set(by_kind["Deployment"]) == set(COMPONENTS)
    assert set(by_kind["Service"]) == set(COMPONENTS)
    assert set(by_kind["PodDisruptionBudget"]) == set(COMPONENTS)
    # Every event consumer that can run as competing replicas scales on CPU.
    assert set(by_kind["HorizontalPodAutoscaler"]) == {"ingest", "quality", "plantid", "mobis"}
    for name, deployment in by_kind["Deployment"].items():
        assert deployment["metadata"]["namespace"] == "c4c"
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        (container,) = pod["containers"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", name
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", name
        assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
        assert {"cpu", "memory"} <= container["resources"]["limits"].keys()
        assert container["image"].startswith(f"registry.example.org/c4c/{name}:")
        env = {item["name"]: item for item in container["env"]}
        assert env["C4C_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["key"] == (
            f"{name}-database-url"
        )
    secret = by_kind["Secret"]
    (secret_name,) = secret
    assert secret_name.startswith("c4c-secrets-")  # hashed by the generator: rollouts follow
    keys = next(iter(secret.values()))["data"].keys()
    assert {f"{name}-database-url" for name in COMPONENTS} | {
        "broker-url",
        "principal-secret",
    } <= keys
    (ingress,) = by_kind["Ingress"].values()
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == "gateway"


def test_grafana_provisions_one_datasource_and_dashboards_with_stable_uids() -> None:
    datasources = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"]
    (datasource,) = datasources
    assert datasource["type"] == "prometheus"
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "c4c.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"

    boards = dashboards()
    assert {board["uid"] for board in boards.values()} == DASHBOARD_UIDS
    for filename, board in boards.items():
        assert filename == f"{board['uid']}.json"
        ids = [panel["id"] for panel in board["panels"]]
        assert len(ids) == len(set(ids)), filename
        for panel in board["panels"]:
            assert panel["title"], filename
            assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["expr"].strip(), panel["title"]
                assert target["datasource"]["uid"] == datasource["uid"]


@pytest.fixture
def database_names(postgres_url: str) -> Iterator[tuple[list[str], dict[str, str]]]:
    url = make_url(postgres_url)
    names = [f"t_{uuid.uuid4().hex[:8]}_{name}" for name in ("ingest", "video")]
    env = {
        "PATH": os.environ["PATH"],
        "PGHOST": url.host or "127.0.0.1",
        "PGPORT": str(url.port or 5432),
        "POSTGRES_USER": url.username or "postgres",
        "C4C_DATABASES": " ".join(names),
    }
    if url.password:
        env["PGPASSWORD"] = url.password
    yield names, env
    for name in names:
        subprocess.run(
            [
                "psql",
                "--username",
                env["POSTGRES_USER"],
                "--dbname",
                "postgres",
                "--command",
                f'DROP DATABASE IF EXISTS "{name}"',
            ],
            env=env,
            capture_output=True,
            check=False,
            timeout=60,
        )


@pytest.mark.postgres
def test_postgres_init_script_creates_one_database_per_component_once(
    database_names: tuple[list[str], dict[str, str]],
) -> None:
    names, env = database_names
    script = DEPLOY / "postgres" / "create-databases.sh"
    first = run("sh", script, env=env)
    assert all(f"created database {name}" in first.stdout for name in names), first.stdout
    again = run("sh", script, env=env)  # a rerun (e.g. by hand) changes nothing
    assert all(f"database {name} exists" in again.stdout for name in names), again.stdout
    listed = run(
        "psql",
        "--username",
        env["POSTGRES_USER"],
        "--dbname",
        "postgres",
        "--tuples-only",
        "--no-align",
        "--command",
        "SELECT datname FROM pg_database",
        env=env,
    ).stdout.split()
    assert set(names) <= set(listed)
