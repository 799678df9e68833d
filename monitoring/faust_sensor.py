"""Faust's own Prometheus sensor, on the pipeline's registry under a fixed prefix.

faust-streaming's ``setup_prometheus_sensors`` names its metrics
``<prefix>_<name>`` (prefix defaults to the app name). The alert rules and
dashboards in ``monitoring/`` use the prefix ``FAUST_SENSOR_PREFIX``, so a worker
must install the sensor through ``install_faust_sensor`` (or pass the same prefix)
for those queries to find series. Consumer lag per topic/partition is

    faust_topic_partition_end_offset - faust_topic_partition_offset_commited

(faust's spelling, "commited").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

if TYPE_CHECKING:
    from faust.types import AppT

FAUST_SENSOR_PREFIX = "faust"


def install_faust_sensor(app: AppT, registry: CollectorRegistry) -> None:
    """Attach faust's PrometheusMonitor to ``app``, its metrics on ``registry``.

    Serve ``registry`` with ``monitoring.metrics.serve_metrics`` so one
    ``/metrics`` endpoint carries both the pipeline's and faust's metrics (faust
    also adds a ``/metrics`` page to its own web server).
    """
    from faust.sensors.prometheus import setup_prometheus_sensors

    setup_prometheus_sensors(app, registry=registry, name_prefix=FAUST_SENSOR_PREFIX)
