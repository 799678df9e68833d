"""Helpers shared by the monitoring tests: the repo's Prometheus/Grafana files, the
PromQL they contain, and the sample names a registry exposes."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from monitoring import GRAFANA_DIR, MONITORING_DIR, PROMETHEUS_DIR

DASHBOARDS = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))
RULES_FILE = PROMETHEUS_DIR / "rules.yml"
RULES_TEST_FILE = PROMETHEUS_DIR / "tests" / "rules_test.yml"
ALERTMANAGER_FILE = MONITORING_DIR / "alertmanager" / "alertmanager.yml"
CONFIG_FILE = PROMETHEUS_DIR / "prometheus.yml"
DATASOURCES_FILE = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"

PROMQL_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
    | {"and", "or", "unless", "inf", "nan"}
)
PROMETHEUS_BUILTINS = frozenset({"up"})  # series Prometheus itself adds to every target


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers that are not functions,
    keywords, label names (in ``{...}`` or ``by (...)``), range durations, numbers or
    strings."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = re.findall(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", text)
    return {name for name in names if name.lower() not in PROMQL_KEYWORDS}


def load_dashboard(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(dashboard) for t in p.get("targets", []) if "expr" in t]


def rules() -> list[dict[str, Any]]:
    """Every rule of the shipped rules file."""
    groups = yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


def rule_exprs() -> list[str]:
    return [rule["expr"] for rule in rules()]


def template_queries(dashboard: dict[str, Any]) -> list[str]:
    """PromQL inside ``label_values(<expr>, label)`` template variables."""
    out = []
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        match = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", query or "")
        if match:
            out.append(match.group(1))
    return out


SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
}


def exposed_names(registry: CollectorRegistry) -> set[str]:
    """Sample names the registry exposes, whether or not a labelled child exists yet."""
    return {
        family.name + suffix
        for family in registry.collect()
        for suffix in SUFFIXES.get(family.type, ("",))
    }


INSTALL_HINT = (
    "run scripts/install-prometheus.sh (installs Debian's prometheus and "
    "prometheus-alertmanager packages)"
)


def tool(name: str) -> str:
    """Path of a Prometheus or Alertmanager binary; a failure (never a skip) when it
    is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found on PATH: {INSTALL_HINT}")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def query(base: str, expr: str) -> dict[str, Any]:
    """An instant query against Prometheus' HTTP API (errors come back as JSON)."""
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:  # 400 carries the parse error
        return json.load(error)


def concrete(expr: str) -> str:
    """Grafana's variables as a panel would send them."""
    return expr.replace("$__rate_interval", "1m").replace("$measure", ".*")


@contextlib.contextmanager
def running_prometheus(targets: list[str], workdir: Path, min_scrapes: int = 3) -> Iterator[str]:
    """A real Prometheus on 127.0.0.1 with the repo's config and rules, its worker
    job pointed at ``targets`` and scraping every second; yields its base URL once
    every target has been scraped ``min_scrapes`` times (rate() needs two)."""
    binary = tool("prometheus")
    config = yaml.safe_load(CONFIG_FILE.read_text(encoding="utf-8"))
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(RULES_FILE)]
    worker = next(job for job in config["scrape_configs"] if job["job_name"] == "efficacy-worker")
    worker.pop("dns_sd_configs", None)  # compose's service discovery -> these targets
    worker["static_configs"] = [{"targets": targets}]
    config["scrape_configs"] = [worker]
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    base = f"http://127.0.0.1:{free_port()}"
    log_path = workdir / "prometheus.log"
    with log_path.open("w") as log:
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
                    pytest.fail(f"prometheus exited: {log_path.read_text()[-2000:]}")
                try:
                    scrapes = query(base, 'count_over_time(up{job="efficacy-worker"}[1m])')
                    result = scrapes.get("data", {}).get("result", [])
                    if len(result) == len(targets) and all(
                        float(r["value"][1]) >= min_scrapes for r in result
                    ):
                        break
                except (urllib.error.URLError, ConnectionError):
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"no scrapes: {log_path.read_text()[-2000:]}")
                time.sleep(0.5)
            yield base
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
