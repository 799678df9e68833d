"""Helpers shared by the monitoring tests: the repo's Prometheus/Grafana files, the
PromQL they contain, and the sample names a registry exposes."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from monitoring import GRAFANA_DIR, PROMETHEUS_DIR

DASHBOARDS = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))
RULES_FILE = PROMETHEUS_DIR / "rules.yml"
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


def rule_exprs() -> list[str]:
    rules = yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


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
