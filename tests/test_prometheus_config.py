"""The shipped Prometheus and Alertmanager files against the real tools (Debian's
packages).

``promtool check config`` / ``check rules`` on monitoring/prometheus/, ``promtool
test rules`` on its unit tests of every alert (the rebalance cases included),
every alert's runbook section, ``amtool check-config`` on
monitoring/alertmanager/, then a real Prometheus on loopback scraping a
``serve_metrics`` endpoint whose registry holds every pipeline metric (one value
per label set) and faust's sensor: the alert rules load, and every dashboard
query returns at least one series. When promtool, amtool or prometheus is missing
these tests fail, never skip: scripts/install-prometheus.sh installs them (``make
test`` runs it).
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from faust.sensors.prometheus import FaustMetrics
from monitoring_files import (
    ALERTMANAGER_FILE,
    CONFIG_FILE,
    DASHBOARDS,
    RULES_FILE,
    RULES_TEST_FILE,
    concrete,
    dashboard_exprs,
    load_dashboard,
    query,
    rule_exprs,
    rules,
    running_prometheus,
    template_queries,
    tool,
)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from monitoring.faust_sensor import FAUST_SENSOR_PREFIX
from monitoring.metrics import (
    CACHE_RESULTS,
    CLASSIFICATIONS,
    DRIFT_KINDS,
    SCORE_TRIGGERS,
    STRUCTURES,
    create_metrics,
    serve_metrics,
)
from streams.patient_step import STAGES


def test_promtool_check_config() -> None:
    result = subprocess.run(
        [tool("promtool"), "check", "config", str(CONFIG_FILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_check_rules() -> None:
    result = subprocess.run(
        [tool("promtool"), "check", "rules", str(RULES_FILE)],
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
        [tool("promtool"), "check", "rules", str(broken)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0


# ---------------------------------------------------------------- alerts: unit tests, runbook

RUNBOOK = Path(__file__).resolve().parent.parent / "docs" / "runbook.md"


def alerts() -> list[dict]:
    return [rule for rule in rules() if "alert" in rule]


def promtool_test_rules(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [tool("promtool"), "test", "rules", path.name],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=path.parent,  # rule_files are relative to the test file
    )


def test_promtool_test_rules() -> None:
    result = promtool_test_rules(RULES_TEST_FILE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_unit_tests_that_fire_it_and_keep_it_quiet() -> None:
    """Each alert is expected to fire in at least one case and to stay quiet in
    another (before its ``for``, or a case it must not fire on)."""
    suite = yaml.safe_load(RULES_TEST_FILE.read_text(encoding="utf-8"))
    fired, quiet = set(), set()
    for case in suite["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alerts()}
    assert names - fired == set(), "alerts no unit test fires"
    assert names - quiet == set(), "alerts no unit test keeps quiet"


def test_the_rule_tests_can_fail(tmp_path: Path) -> None:
    """The rebalance case fails against EfficacyNoPopulationUpdate on each worker's
    own gauge (the stale worker's timestamp would fire it)."""
    for name in (RULES_FILE.name, f"tests/{RULES_TEST_FILE.name}"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy(RULES_TEST_FILE.parent.parent / name, tmp_path / name)
    aggregated = "max by (measure) (efficacy_population_last_update_timestamp_seconds)"
    text = (tmp_path / RULES_FILE.name).read_text()
    assert aggregated in text
    (tmp_path / RULES_FILE.name).write_text(
        text.replace(aggregated, "efficacy_population_last_update_timestamp_seconds")
    )
    result = promtool_test_rules(tmp_path / "tests" / RULES_TEST_FILE.name)
    assert result.returncode != 0, result.stdout
    assert "alertname: EfficacyNoPopulationUpdate" in result.stdout + result.stderr


def runbook_anchors() -> set[str]:
    """The anchors of docs/runbook.md's headings, as GitHub makes them."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", RUNBOOK.read_text(encoding="utf-8"), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_every_alert_links_its_runbook_section() -> None:
    anchors = runbook_anchors()
    for rule in alerts():
        url = rule["annotations"].get("runbook_url", "")
        page, _, anchor = url.partition("#")
        assert page == "docs/runbook.md", rule["alert"]
        assert anchor == rule["alert"].lower(), rule["alert"]
        assert anchor in anchors, f"docs/runbook.md has no section {rule['alert']}"


def test_amtool_check_config() -> None:
    result = subprocess.run(
        [tool("amtool"), "check-config", str(ALERTMANAGER_FILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_amtool_rejects_a_broken_config(tmp_path: Path) -> None:
    """The check above can fail: a route to a receiver that does not exist."""
    config = yaml.safe_load(ALERTMANAGER_FILE.read_text(encoding="utf-8"))
    config["route"]["receiver"] = "nobody"
    broken = tmp_path / "alertmanager.yml"
    broken.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [tool("amtool"), "check-config", str(broken)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0


# ---------------------------------------------------------------- a live Prometheus


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
        "structure": STRUCTURES,
        "covariate": ("age", "group=B"),
        "statistic": ("mean", "q05", "q95"),
        "group": ("glycaemic",),
        "result": CACHE_RESULTS,
        "stage": STAGES,
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


@pytest.fixture(scope="module")
def live_prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Prometheus on 127.0.0.1 scraping a populated metrics endpoint every second,
    with the repo's rules; yields its base URL once the target has been scraped
    at least three times (rate() needs two samples)."""
    registry = CollectorRegistry()
    _populate(registry)
    server = serve_metrics(registry, port=0)
    target = f"127.0.0.1:{server.server_address[1]}"
    try:
        with running_prometheus([target], tmp_path_factory.mktemp("prometheus")) as base:
            yield base
    finally:
        server.shutdown()
        server.server_close()


def test_prometheus_scrapes_the_endpoint_and_loads_the_rules(live_prometheus: str) -> None:
    up = query(live_prometheus, 'up{job="efficacy-worker"}')
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
        answer = query(live_prometheus, concrete(expr))
        assert answer["status"] == "success", f"{expr!r}: {answer.get('error')}"
        if not answer["data"]["result"]:
            empty.append(expr)
    assert not empty, f"queries with no series: {empty}"
