"""docker-compose.yml and the Dockerfile, checked by reading them (no Docker engine
here): services, health checks, wiring between services, and that every mounted
path exists in the repository."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from monitoring_files import CONFIG_FILE, DATASOURCES_FILE

from monitoring import GRAFANA_DIR

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return command.split() if isinstance(command, str) else [str(part) for part in command]


def _bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host path, container path) of every bind mount (named volumes excluded)."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target = (
            volume.split(":")[:2]
            if isinstance(volume, str)
            else (
                volume["source"],
                volume["target"],
            )
        )
        if source.startswith((".", "/")):
            mounts.append((source, target))
    return mounts


def test_the_stack_has_its_services(services: dict[str, Any]) -> None:
    assert set(services) == {"kafka", "worker", "simulator", "prometheus", "grafana"}
    assert services["simulator"]["profiles"] == ["demo"]
    for name in ("kafka", "worker", "prometheus", "grafana"):
        assert "profiles" not in services[name], f"{name} must start by default"


def test_every_long_running_service_has_a_healthcheck(services: dict[str, Any]) -> None:
    for name in ("kafka", "worker", "prometheus", "grafana"):
        check = services[name].get("healthcheck")
        assert check and check["test"][0] in ("CMD", "CMD-SHELL"), name
        assert len(check["test"]) > 1 and all(str(part).strip() for part in check["test"])
    assert "kafka-broker-api-versions.sh" in " ".join(services["kafka"]["healthcheck"]["test"])


def test_kafka_is_a_single_kraft_node(services: dict[str, Any]) -> None:
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = _env(kafka)
    node_id = env["KAFKA_NODE_ID"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    listeners = dict(
        re.fullmatch(r"(\w+)://[^:]*:(\d+)", item).groups()  # type: ignore[union-attr]
        for item in env["KAFKA_LISTENERS"].split(",")
    )
    protocol_map = dict(
        item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    assert set(listeners) <= set(protocol_map)
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{node_id}@kafka:{listeners[controller]}"
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] in listeners
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    advertised = dict(item.split("://") for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert controller not in advertised
    # what the worker and simulator connect to is advertised on a broker listener
    internal = advertised[env["KAFKA_INTER_BROKER_LISTENER_NAME"]]
    assert internal.split(":")[1] == listeners[env["KAFKA_INTER_BROKER_LISTENER_NAME"]]
    for name in ("worker", "simulator"):
        assert _env(services[name])["EFFICACY_BOOTSTRAP_SERVERS"] == internal == "kafka:9092"


def test_worker_and_simulator(services: dict[str, Any]) -> None:
    from cli.main import COMMANDS

    worker, simulator = services["worker"], services["simulator"]
    assert worker["build"] == "."
    assert _command(worker)[:2] == ["efficacy", "worker"]
    assert _command(simulator)[:2] == ["efficacy", "simulate"]
    assert {"worker", "simulate"} <= set(COMMANDS)  # the console script has both
    env = _env(worker)
    assert env["EFFICACY_STORE_URL"] == "rocksdb://"
    assert env["EFFICACY_METRICS_PORT"] == "9108"
    assert worker["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert simulator["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert "9108" in " ".join(worker["healthcheck"]["test"])


def test_dockerfile_builds_the_worker() -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.MULTILINE)
    assert re.search(r'^CMD \["efficacy", "worker"', text, re.MULTILINE)
    copied = []
    for path in re.findall(r"^COPY (.+) \S+$", text, re.MULTILINE):
        for part in path.split():
            assert (ROOT / part).exists(), f"Dockerfile copies missing {part}"
            copied.append(part)
    # Every package the project installs is in the image (the console script's too).
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    assert set(packages) <= set(copied)
    # Dependencies are installed before any source is copied (a cached layer), the
    # project after them without re-resolving them.
    dependencies = text.index("pip install -r")
    assert all(text.index(f"COPY {p} ") > dependencies for p in packages)
    assert re.search(r"^RUN pip install --no-deps \.$", text, re.MULTILINE)


def test_mounted_paths_exist_in_the_repo(services: dict[str, Any]) -> None:
    mounts = [m for service in services.values() for m in _bind_mounts(service)]
    assert len(mounts) >= 3
    for source, _ in mounts:
        assert (ROOT / source).resolve().exists(), f"mounted {source} is not in the repo"
        assert (ROOT / source).resolve().is_relative_to(ROOT), source


def test_prometheus_mount_config_and_scrape_target(services: dict[str, Any]) -> None:
    prometheus = services["prometheus"]
    mounts = dict(_bind_mounts(prometheus))
    source = next(src for src, dst in mounts.items() if dst == "/etc/prometheus")
    assert (ROOT / source).resolve() == CONFIG_FILE.parent
    assert "--config.file=/etc/prometheus/prometheus.yml" in _command(prometheus)
    config = yaml.safe_load(CONFIG_FILE.read_text(encoding="utf-8"))
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "efficacy-worker")
    discovered = [(name, sd["port"]) for sd in job["dns_sd_configs"] for name in sd["names"]]
    assert discovered == [("worker", int(_env(services["worker"])["EFFICACY_METRICS_PORT"]))]


def test_grafana_provisioning_is_wired(services: dict[str, Any]) -> None:
    grafana = services["grafana"]
    mounts = dict(_bind_mounts(grafana))
    assert mounts["./monitoring/grafana/provisioning"] == "/etc/grafana/provisioning"
    providers = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "dashboards" / "dashboards.yml").read_text(encoding="utf-8")
    )["providers"]
    assert mounts["./monitoring/grafana/dashboards"] == providers[0]["options"]["path"]
    env = _env(grafana)
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (GRAFANA_DIR / "dashboards" / Path(home).name).exists()
    url = yaml.safe_load(DATASOURCES_FILE.read_text(encoding="utf-8"))["datasources"][0]["url"]
    assert url == "http://prometheus:9090"
    assert "9090:9090" in services["prometheus"]["ports"]


def test_named_volumes_are_declared(compose: dict[str, Any], services: dict[str, Any]) -> None:
    declared = set(compose.get("volumes", {}))
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in declared, source
