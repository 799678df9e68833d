"""Monitoring: Prometheus metrics, drift statistics, Prometheus and Grafana files.

- ``monitoring.metrics``: ``create_metrics(registry) -> Metrics``, ``serve_metrics``.
- ``monitoring.drift``: ``DriftConfig`` and river-shaped drift detectors (numpy only).
- ``monitoring.faust_sensor``: faust's own Prometheus sensor under the prefix the
  rules and dashboards use.
- ``monitoring/prometheus/``, ``monitoring/grafana/``: scrape config, alert rules,
  Grafana provisioning and dashboards (data files, shipped as package data).

Nothing here imports ``streams``; ``model`` never imports this package.
"""

from pathlib import Path

from monitoring.metrics import Metrics, create_metrics, serve_metrics

MONITORING_DIR = Path(__file__).resolve().parent
PROMETHEUS_DIR = MONITORING_DIR / "prometheus"
GRAFANA_DIR = MONITORING_DIR / "grafana"

__all__ = [
    "GRAFANA_DIR",
    "MONITORING_DIR",
    "PROMETHEUS_DIR",
    "Metrics",
    "create_metrics",
    "serve_metrics",
]
