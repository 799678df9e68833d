"""The shipped Prometheus files against a real Prometheus (Debian's package).

``promtool check config`` / ``check rules`` on monitoring/prometheus/, then a real
Prometheus on loopback scraping a ``serve_metrics`` endpoint whose registry holds
every pipeline metric (one value per label set) and faust's sensor: the alert rules
load, and every dashboard query returns at least one series. When promtool or
prometheus is missing these tests fail, never skip: scripts/install-prometheus.sh
installs them (``make test`` runs it).
"""

from __future__ import annotations

import itertools
import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from faust.sensors.prometheus import FaustMetrics
from monitoring_files import (
    CONFIG_FILE,
    DASHBOARDS,
    RULES_FILE,
    dashboard_exprs,
    load_dashboard,
    rule_exprs,
    template_queries,
)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from monitoring.faust_sensor import FAUST_SENSOR_PREFIX
from monitoring.metrics import (
    CLASSIFICATIONS,
    DRIFT_KINDS,
    SCORE_TRIGGERS,
    create_metrics,
    serve_metrics,
)

INSTALL_HINT = "run scripts/install-prometheus.sh (installs Debian's prometheus package)"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found on PATH: {INSTALL_HINT}")
    return path


def test_promtool_check_config() -> None:
    result = subprocess.run(
        [_tool("promtool"), "check", "config", str(CONFIG_FILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_check_rules() -> None:
    result = subprocess.run(
        [_tool("promtool"), "check", "rules", str(RULES_FILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rule_exprs())} rules found" in result.stdout


def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    """The check above can fail: promtool rejects a rule with invalid PromQL."""
    broken = tmp_path / "broken.yml"
    broken.write_text(
        yaml.safe_dump({"groups": [{"name": "x", "rules": [{"alert": "A", "expr": "rate(x[5m]"}]}]})
    )
    result = subprocess.run(
        [_tool("promtool"), "check", "rules", str(broken)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0


# ---------------------------------------------------------------- a live Prometheus


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _populate(registry: CollectorRegistry) -> None:
    """One value for every pipeline metric and label set a worker would produce, and
    the faust sensor's metrics on the same registry."""
    metrics = create_metrics(registry)
    label_values = {
        "source": ("wearables", "labs"),
        "reason": ("schema", "implausible"),
        "measure": ("hba1c", "phq9"),
        "classification": CLASSIFICATIONS,
        "kind": DRIFT_KINDS,
        "trigger": SCORE_TRIGGERS,
    }
    for metric in metrics:
        names = metric._labelnames
        for values in itertools.product(*(label_values[name] for name in names)):
            child = metric.labels(*values) if names else metric
            if isinstance(metric, Counter):
                child.inc(1)
            elif isinstance(metric, Gauge):
                child.set(1.5)
            elif isinstance(metric, Histogram):
                child.observe(0.2)
    metrics.population_last_update.labels(measure="hba1c").set(time.time())
    faust = FaustMetrics.create(registry, FAUST_SENSOR_PREFIX)
    faust.messages_received_per_topics.labels(topic="efficacy.labs").inc(5)
    faust.events_runtime_latency.observe(12.0)
    faust.total_error_messages_sent.inc(0)
    faust.total_rebalances.set(1)
    faust.topic_partition_end_offset.labels(topic="efficacy.labs", partition=0).set(120)
    faust.topic_partition_offset_commited.labels(topic="efficacy.labs", partition=0).set(100)


def _query(base: str, expr: str) -> dict[str, Any]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:  # 400 carries the parse error
        return json.load(error)


@pytest.fixture(scope="module")
def live_prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Prometheus on 127.0.0.1 scraping a populated metrics endpoint every second,
    with the repo's rules; yields its base URL once the target has been scraped
    at least three times (rate() needs two samples)."""
    binary = _tool("prometheus")
    registry = CollectorRegistry()
    _populate(registry)
    server = serve_metrics(registry, port=0)
    target = f"127.0.0.1:{server.server_address[1]}"
    workdir = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load(CONFIG_FILE.read_text(encoding="utf-8"))
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(RULES_FILE)]
    worker = next(job for job in config["scrape_configs"] if job["job_name"] == "efficacy-worker")
    worker.pop("dns_sd_configs")  # compose's service discovery -> this test's endpoint
    worker["static_configs"] = [{"targets": [target]}]
    config["scrape_configs"] = [worker]
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    base = f"http://127.0.0.1:{_free_port()}"
    log = (workdir / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address={base.removeprefix('http://')}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"prometheus exited: {(workdir / 'prometheus.log').read_text()[-2000:]}"
                )
            try:
                scrapes = _query(base, f'count_over_time(up{{instance="{target}"}}[1m])')
                result = scrapes.get("data", {}).get("result", [])
                if result and float(result[0]["value"][1]) >= 3:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no scrapes: {(workdir / 'prometheus.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        server.shutdown()
        server.server_close()


def _concrete(expr: str) -> str:
    """Grafana's variables as a panel would send them."""
    return expr.replace("$__rate_interval", "1m").replace("$measure", ".*")


def test_prometheus_scrapes_the_endpoint_and_loads_the_rules(live_prometheus: str) -> None:
    up = _query(live_prometheus, 'up{job="efficacy-worker"}')
    assert [r["value"][1] for r in up["data"]["result"]] == ["1"]
    with urllib.request.urlopen(f"{live_prometheus}/api/v1/rules", timeout=10) as response:
        groups = json.load(response)["data"]["groups"]
    loaded = [rule for group in groups for rule in group["rules"]]
    assert len(loaded) == len(rule_exprs())
    assert all(rule["health"] != "err" for rule in loaded), loaded


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_every_dashboard_query_returns_series(live_prometheus: str, path: Path) -> None:
    dashboard = load_dashboard(path)
    empty = []
    for expr in dashboard_exprs(dashboard) + template_queries(dashboard):
        answer = _query(live_prometheus, _concrete(expr))
        assert answer["status"] == "success", f"{expr!r}: {answer.get('error')}"
        if not answer["data"]["result"]:
            empty.append(expr)
    assert not empty, f"queries with no series: {empty}"
