"""Metric definitions, and the dashboards and rules that use them.

Names, types and labels are checked against the design's contract; every metric a
dashboard panel, template variable or alert rule selects must be defined by
``monitoring.metrics`` or by faust's Prometheus sensor under the prefix
``monitoring.faust_sensor`` installs.
"""

from __future__ import annotations

import re
import urllib.request

import pytest
import yaml
from faust.sensors.prometheus import FaustMetrics
from monitoring_files import (
    DASHBOARDS,
    DATASOURCES_FILE,
    PROMETHEUS_BUILTINS,
    dashboard_exprs,
    exposed_names,
    load_dashboard,
    metric_names,
    panels,
    rule_exprs,
    template_queries,
)
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families

from monitoring.faust_sensor import FAUST_SENSOR_PREFIX
from monitoring.metrics import CLASSIFICATIONS, Metrics, create_metrics, serve_metrics

# The contract of the design ("Monitoring") and the issue: kind and label names.
EXPECTED: dict[str, tuple[type, tuple[str, ...]]] = {
    "efficacy_events_accepted": (Counter, ("source",)),
    "efficacy_events_dead_lettered": (Counter, ("source", "reason")),
    "efficacy_batch_processing_seconds": (Histogram, ()),
    "efficacy_step_cpu_seconds": (Counter, ("stage",)),
    "efficacy_population_update_seconds": (Histogram, ("measure",)),
    "efficacy_event_to_score_seconds": (Histogram, ()),
    "efficacy_population_elbo": (Gauge, ("measure",)),
    "efficacy_svi_steps": (Counter, ("measure",)),
    "efficacy_population_effect_mean": (Gauge, ("measure",)),
    "efficacy_population_effect_q05": (Gauge, ("measure",)),
    "efficacy_population_effect_q95": (Gauge, ("measure",)),
    "efficacy_population_effect_sd_patients": (Gauge, ("measure",)),
    "efficacy_population_effect_sd_cohorts": (Gauge, ("measure",)),
    "efficacy_drift_kl_divergence": (Gauge, ("measure",)),
    "efficacy_drift_effect_shift_sd_units": (Gauge, ("measure",)),
    "efficacy_drift_alerts": (Counter, ("measure", "kind")),
    "efficacy_patients": (Gauge, ("measure", "classification")),
    "efficacy_patients_tracked": (Gauge, ()),
    "efficacy_raw_backlog_records": (Gauge, ()),
    "efficacy_state_cache_lookups": (Counter, ("result",)),
    "efficacy_state_cache_bytes": (Gauge, ()),
    "efficacy_population_posterior_version": (Gauge, ("measure",)),
    "efficacy_scores_published": (Counter, ("trigger",)),
    "efficacy_selection_elpd_diff": (Gauge, ("measure", "structure")),
    "efficacy_selection_elpd_diff_se": (Gauge, ("measure", "structure")),
    "efficacy_selection_chosen": (Gauge, ("measure", "structure")),
    "efficacy_selection_seconds": (Histogram, ("measure",)),
    "efficacy_selection_last_run_timestamp_seconds": (Gauge, ("measure",)),
    "efficacy_selection_failures": (Counter, ("measure",)),
    "efficacy_joint_posteriors_thinned": (Counter, ("group",)),
}


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    return create_metrics(registry)


def _by_name(metrics: Metrics) -> dict[str, object]:
    return {metric._name: metric for metric in metrics}


def test_every_field_is_a_metric_on_the_injected_registry(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    families = {family.name for family in registry.collect()}
    assert len(families) == len(metrics) == len(set(metrics))
    assert all(metric._name in families for metric in metrics)
    global_names = {family.name for family in REGISTRY.collect()}
    assert not families & global_names, "a metric landed on prometheus_client's global registry"
    with pytest.raises(ValueError, match="Duplicated"):
        create_metrics(registry)


def test_names_types_and_labels_follow_the_contract(metrics: Metrics) -> None:
    by_name = _by_name(metrics)
    for name, (kind, labels) in EXPECTED.items():
        assert name in by_name, f"missing {name}"
        assert isinstance(by_name[name], kind), f"{name} is not a {kind.__name__}"
        assert by_name[name]._labelnames == labels, name


def test_prometheus_naming_conventions(registry: CollectorRegistry, metrics: Metrics) -> None:
    for family in registry.collect():
        assert re.fullmatch(r"efficacy_[a-z0-9_]+", family.name), family.name
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), f"histogram {family.name} without a unit"
        if family.type == "gauge":
            assert not family.name.endswith("_total"), f"gauge {family.name} named like a counter"
    exposed = exposed_names(registry)
    counters = [m for m in metrics if isinstance(m, Counter)]
    assert counters and all(f"{m._name}_total" in exposed for m in counters)


def test_no_label_identifies_a_patient(registry: CollectorRegistry, metrics: Metrics) -> None:
    labels = {label for metric in metrics for label in metric._labelnames}
    assert labels, "no labelled metric at all"
    allowed = {"source", "reason", "measure", "classification", "kind", "trigger", "structure"}
    allowed |= {"covariate", "statistic"}  # catalogue covariate names, mean/q05/q95
    allowed |= {"group"}  # catalogue joint group names
    allowed |= {"result"}  # hit / miss
    allowed |= {"stage"}  # streams.patient_step.STAGES
    assert labels <= allowed
    for label in labels:
        assert not re.search(r"patient|subject|person|user|_id$|^id$", label), label


def test_histograms_have_explicit_buckets(metrics: Metrics) -> None:
    histograms = [m for m in metrics if isinstance(m, Histogram)]
    assert len(histograms) == 5
    for histogram in histograms:
        buckets = histogram._upper_bounds
        assert tuple(buckets[:-1]) != Histogram.DEFAULT_BUCKETS[:-1], histogram._name
        assert list(buckets) == sorted(buckets) and buckets[-1] == float("inf")


def test_values_are_readable_from_the_registry(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    metrics.events_dead_lettered.labels(source="labs", reason="implausible").inc(3)
    for classification in CLASSIFICATIONS:
        metrics.patients_by_classification.labels(
            measure="hba1c", classification=classification
        ).set(len(classification))
    metrics.population_update_seconds.labels(measure="hba1c").observe(4.2)
    get = registry.get_sample_value
    assert (
        get("efficacy_events_dead_lettered_total", {"source": "labs", "reason": "implausible"}) == 3
    )
    assert get("efficacy_patients", {"measure": "hba1c", "classification": "non_responder"}) == 13
    assert get("efficacy_population_update_seconds_count", {"measure": "hba1c"}) == 1
    assert get("efficacy_population_update_seconds_bucket", {"measure": "hba1c", "le": "2.5"}) == 0
    assert get("efficacy_population_update_seconds_bucket", {"measure": "hba1c", "le": "5.0"}) == 1


# ---------------------------------------------------------------- PromQL users


def test_the_promql_name_extractor() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, measure) (rate(a_seconds_bucket{measure=~"$m"}'
        "[$__rate_interval]))) / clamp_min(b_total offset 5m, 1e-9) > 0.5 and on (topic) c"
        ' - time() + up{job="x"}'
    )
    assert metric_names(expr) == {"a_seconds_bucket", "b_total", "c", "up"}


@pytest.fixture
def known_names(registry: CollectorRegistry, metrics: Metrics) -> set[str]:
    FaustMetrics.create(registry, FAUST_SENSOR_PREFIX)  # the same registry, as a worker has it
    return exposed_names(registry) | PROMETHEUS_BUILTINS


def test_every_rule_uses_defined_metrics(known_names: set[str]) -> None:
    exprs = rule_exprs()
    assert len(exprs) >= 4
    used = set().union(*(metric_names(e) for e in exprs))
    assert used - known_names == set()
    # what the issue asks alerts on
    assert {"efficacy_drift_alerts_total", "efficacy_events_dead_lettered_total"} <= used
    assert "faust_topic_partition_end_offset" in used
    assert "efficacy_population_last_update_timestamp_seconds" in used


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_every_dashboard_query_uses_defined_metrics(path, known_names: set[str]) -> None:
    dashboard = load_dashboard(path)
    exprs = dashboard_exprs(dashboard) + template_queries(dashboard)
    assert exprs
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= known_names, f"{path.name}: unknown {names - known_names} in {expr!r}"


def test_the_two_dashboards_exist() -> None:
    assert {p.stem for p in DASHBOARDS} == {"efficacy-overview", "pipeline-health"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_structure_matches_the_provisioning(path) -> None:
    provisioned = yaml.safe_load(DATASOURCES_FILE.read_text(encoding="utf-8"))["datasources"]
    prometheus = [d for d in provisioned if d["type"] == "prometheus"]
    assert len(prometheus) == 1 and prometheus[0]["uid"]
    uid = prometheus[0]["uid"]
    dashboard = load_dashboard(path)
    assert dashboard["uid"] == path.stem and dashboard["title"]
    graphs = [p for p in panels(dashboard) if p["type"] != "row"]
    assert len(graphs) >= 4
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in graphs:
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid and target["expr"].strip()
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            assert var["datasource"]["uid"] == uid


def test_overview_shows_effect_interval_classifications_and_drift() -> None:
    exprs = " ".join(dashboard_exprs(load_dashboard(DASHBOARDS[0])))
    for name in (
        "efficacy_population_effect_mean",
        "efficacy_population_effect_q05",
        "efficacy_population_effect_q95",
        "efficacy_patients",
        "efficacy_drift_kl_divergence",
        "efficacy_drift_alerts_total",
    ):
        assert re.search(rf"\b{name}\b", exprs), name


# ---------------------------------------------------------------- /metrics over HTTP


def test_serve_metrics_answers_a_scrape(registry: CollectorRegistry, metrics: Metrics) -> None:
    metrics.effect_mean.labels(measure="phq9").set(-2.75)
    metrics.events_accepted.labels(source="wearables").inc(7)
    server = serve_metrics(registry, port=0)
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1" and port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert response.status == 200
            body = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }
    assert samples[("efficacy_population_effect_mean", (("measure", "phq9"),))] == -2.75
    assert samples[("efficacy_events_accepted_total", (("source", "wearables"),))] == 7


def test_install_faust_sensor_puts_faust_metrics_on_our_registry(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    import faust

    from monitoring.faust_sensor import install_faust_sensor

    app = faust.App("sensor-test", broker="kafka://127.0.0.1:9", web_enabled=False)
    install_faust_sensor(app, registry)
    names = exposed_names(registry)
    assert "faust_topic_partition_end_offset" in names
    assert "faust_topic_partition_offset_commited" in names
    assert "efficacy_events_accepted_total" in names  # one endpoint serves both
    assert type(app.monitor).__name__ == "PrometheusMonitor"


def test_the_record_cache_totals_become_counters_once(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    """Telemetry.state_cache gets the cache's running totals after every batch and
    adds only what is new to the counters."""
    from streams.telemetry import Telemetry

    telemetry = Telemetry(metrics)
    telemetry.state_cache(hits=5, misses=2, size_bytes=4000)
    telemetry.state_cache(hits=8, misses=2, size_bytes=6000)
    telemetry.state_cache(hits=8, misses=3, size_bytes=5000)

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert sample("efficacy_state_cache_lookups_total", result="hit") == 8
    assert sample("efficacy_state_cache_lookups_total", result="miss") == 3
    assert sample("efficacy_state_cache_bytes") == 5000


def test_step_stages_add_up_per_stage(registry: CollectorRegistry, metrics: Metrics) -> None:
    """Telemetry.step_stages adds each step's seconds to its stage's counter."""
    from streams.telemetry import Telemetry

    telemetry = Telemetry(metrics)
    telemetry.step_stages({"parse": 0.25, "score": 0.5})
    telemetry.step_stages({"parse": 0.125, "save": 0.0625})

    def sample(stage: str) -> float | None:
        return registry.get_sample_value("efficacy_step_cpu_seconds_total", {"stage": stage})

    assert sample("parse") == 0.375
    assert sample("score") == 0.5
    assert sample("save") == 0.0625
    assert sample("apply") is None
