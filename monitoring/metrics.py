"""Every Prometheus metric of the pipeline, in one place.

``create_metrics(registry)`` builds them all on an injected ``CollectorRegistry``
(no metric touches prometheus_client's global registry), so a test builds a fresh
set per test and a worker serves exactly its own registry with ``serve_metrics``.

Conventions (https://prometheus.io/docs/practices/naming/): every name starts
with ``efficacy_``; counters end in ``_total``; durations are in seconds and end
in ``_seconds``; timestamps end in ``_timestamp_seconds``. Quantities in the
measure's own unit (effects, sds) carry no unit suffix because the unit differs
per ``measure``. No metric is ever labelled by patient: label values come from
small closed sets (sources, reasons, measures, classifications).

Label values used by the pipeline:

- ``source``: the input topic's short name (``enrollments``, ``wearables``,
  ``labs``, ``pros``, ``fhir-observations``, ``omh-datapoints``).
- ``reason``: the dead-letter reason code (``schema``, ``unit``, ``implausible``,
  ``duplicate``, ...); a small closed set chosen by the ingest agent.
- ``measure``: the outcome measure's configured name.
- ``classification``: one of ``CLASSIFICATIONS``.
- ``kind`` (drift alerts): one of ``DRIFT_KINDS``.
- ``trigger`` (scores published): one of ``SCORE_TRIGGERS``.
- ``structure`` (structure selection): one of ``STRUCTURES``, or with patient
  covariates in the catalogue ``partial+x:<covariate>…`` (catalogue names).
- ``covariate`` / ``statistic`` (effect modifiers): a catalogue covariate's
  design column; ``mean``, ``q05`` or ``q95``.
- ``group``: a catalogue joint group's name (``[joint.<group>]``).
- ``stage``: a stage of the patients agent's step (streams.patient_step.STAGES).
"""

from __future__ import annotations

from typing import NamedTuple
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PREFIX = "efficacy_"

CLASSIFICATIONS: tuple[str, ...] = ("responder", "non_responder", "uncertain", "insufficient_data")
"""Values of the ``classification`` label (the decision rule's four outcomes)."""

DRIFT_KINDS: tuple[str, ...] = ("posterior_shift", "prior_data_conflict", "window_shift")
"""Values of the ``kind`` label of ``efficacy_drift_alerts_total``: successive
population posteriors moved, observations conflict with the posterior predictive,
the recent-window fit departs from the all-time fit."""

SCORE_TRIGGERS: tuple[str, ...] = ("evidence", "population")
"""Values of the ``trigger`` label of ``efficacy_scores_published_total``: new
patient evidence, or a rescore under a new population posterior version."""

CACHE_RESULTS: tuple[str, ...] = ("hit", "miss")
"""Values of the ``result`` label of ``efficacy_state_cache_lookups_total``: the
stored record was held parsed, or was parsed."""

STRUCTURES: tuple[str, ...] = ("complete", "none", "partial", "partial+cohort")
"""Values of the ``structure`` label: the streaming structure selection's
candidates (model.selection.candidate_structures with the cohort attribute),
without patient covariates; with them, also each covariate block's structures."""

# Explicit buckets (seconds). A batch of a few hundred events through the patient
# agent is milliseconds; an SVI update of a few hundred steps is seconds to minutes;
# event-to-score spans batching windows (``stream.take(n, within=s)``) and lag.
BATCH_LATENCY_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
POPULATION_UPDATE_BUCKETS: tuple[float, ...] = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
# A structure selection is K folds x 4 structures of SVI fits, plus compiling
# them after a start: seconds on a small programme, minutes on a large one.
SELECTION_BUCKETS: tuple[float, ...] = (
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1200.0,
    3600.0,
)
EVENT_TO_SCORE_BUCKETS: tuple[float, ...] = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)


class Metrics(NamedTuple):
    """The pipeline's metrics; field comments give the exposed name and labels."""

    # Ingest
    events_accepted: Counter  # efficacy_events_accepted_total{source}
    events_dead_lettered: Counter  # efficacy_events_dead_lettered_total{source, reason}
    events_rerouted: Counter  # efficacy_events_rerouted_total{source}
    # Latencies
    batch_seconds: Histogram  # efficacy_batch_processing_seconds (no labels)
    step_cpu_seconds: Counter  # efficacy_step_cpu_seconds_total{stage}
    population_update_seconds: Histogram  # efficacy_population_update_seconds{measure}
    event_to_score_seconds: Histogram  # efficacy_event_to_score_seconds (no labels)
    event_loop_lag_seconds: Histogram  # efficacy_event_loop_lag_seconds (no labels)
    # Population fit
    elbo: Gauge  # efficacy_population_elbo{measure}
    svi_steps: Counter  # efficacy_svi_steps_total{measure}
    population_version: Gauge  # efficacy_population_posterior_version{measure}
    patients_in_population: Gauge  # efficacy_population_patients{measure}
    population_last_update: Gauge  # efficacy_population_last_update_timestamp_seconds{measure}
    effect_mean: Gauge  # efficacy_population_effect_mean{measure}
    effect_q05: Gauge  # efficacy_population_effect_q05{measure}
    effect_q95: Gauge  # efficacy_population_effect_q95{measure}
    effect_sd_patients: Gauge  # efficacy_population_effect_sd_patients{measure}
    effect_sd_cohorts: Gauge  # efficacy_population_effect_sd_cohorts{measure}
    effect_modifier: Gauge  # efficacy_effect_modifier{measure, covariate, statistic}
    # Drift
    drift_kl: Gauge  # efficacy_drift_kl_divergence{measure}
    drift_shift: Gauge  # efficacy_drift_effect_shift_sd_units{measure}
    drift_window_shift: Gauge  # efficacy_drift_window_shift_sd_units{measure}
    drift_conflict: Gauge  # efficacy_drift_conflict_statistic{measure}
    drift_alerts: Counter  # efficacy_drift_alerts_total{measure, kind}
    # Patients and scores
    patients_by_classification: Gauge  # efficacy_patients{measure, classification}
    patients_tracked: Gauge  # efficacy_patients_tracked (no labels)
    raw_backlog_records: Gauge  # efficacy_raw_backlog_records (no labels)
    group_lag_records: Gauge  # efficacy_group_lag_records (no labels)
    state_cache_lookups: Counter  # efficacy_state_cache_lookups_total{result}
    state_cache_bytes: Gauge  # efficacy_state_cache_bytes (no labels)
    scores_published: Counter  # efficacy_scores_published_total{trigger}
    # Structure selection (advisory: the pipeline keeps its structure)
    selection_elpd_diff: Gauge  # efficacy_selection_elpd_diff{measure, structure}
    selection_elpd_diff_se: Gauge  # efficacy_selection_elpd_diff_se{measure, structure}
    selection_chosen: Gauge  # efficacy_selection_chosen{measure, structure}
    selection_seconds: Histogram  # efficacy_selection_seconds{measure}
    selection_last_run: Gauge  # efficacy_selection_last_run_timestamp_seconds{measure}
    selection_failures: Counter  # efficacy_selection_failures_total{measure}
    # Joint groups
    joint_posteriors_thinned: Counter  # efficacy_joint_posteriors_thinned_total{group}


def create_metrics(registry: CollectorRegistry) -> Metrics:
    """Build every metric of the pipeline on ``registry`` (never the global one).

    Raises ``ValueError`` (from prometheus_client) if called twice on the same
    registry: one registry holds one set.
    """

    def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(PREFIX + name, doc, labels, registry=registry)

    def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(PREFIX + name, doc, labels, registry=registry)

    def histogram(
        name: str, doc: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()
    ) -> Histogram:
        return Histogram(PREFIX + name, doc, labels, registry=registry, buckets=buckets)

    m = ("measure",)
    return Metrics(
        events_accepted=counter(
            "events_accepted_total", "Input records validated and forwarded.", ("source",)
        ),
        events_dead_lettered=counter(
            "events_dead_lettered_total",
            "Input records rejected to the dead-letter topic.",
            ("source", "reason"),
        ),
        events_rerouted=counter(
            "events_rerouted_total",
            "Input records that arrived on another partition than their key's (a producer "
            "without Kafka's murmur2 partitioner) and were sent on to their key's partition.",
            ("source",),
        ),
        batch_seconds=histogram(
            "batch_processing_seconds",
            "Wall time to process one batch taken from the patients stream.",
            BATCH_LATENCY_BUCKETS,
        ),
        step_cpu_seconds=counter(
            "step_cpu_seconds_total",
            "CPU seconds of the event loop's thread in the patients agent's steps, by stage "
            "(streams.patient_step.STAGES: parse, load, apply, score, evidence, save).",
            ("stage",),
        ),
        event_loop_lag_seconds=histogram(
            "event_loop_lag_seconds",
            "How late the worker's event loop ran a timer (streams.loop_lag): blocking work "
            "on the loop delays every agent, heartbeat and commit by this much.",
            BATCH_LATENCY_BUCKETS,
        ),
        population_update_seconds=histogram(
            "population_update_seconds",
            "Wall time of one sequential SVI update of the population posterior.",
            POPULATION_UPDATE_BUCKETS,
            m,
        ),
        event_to_score_seconds=histogram(
            "event_to_score_seconds",
            "From an observation's event time to the publication of the score it changed.",
            EVENT_TO_SCORE_BUCKETS,
        ),
        elbo=gauge("population_elbo", "ELBO of q(theta) after the latest population update.", m),
        svi_steps=counter("svi_steps_total", "SVI optimiser steps run by population updates.", m),
        population_version=gauge(
            "population_posterior_version", "Version of the latest published q(theta).", m
        ),
        patients_in_population=gauge(
            "population_patients", "Patients whose evidence the latest q(theta) was fitted to.", m
        ),
        population_last_update=gauge(
            "population_last_update_timestamp_seconds",
            "Unix time of the latest published population posterior.",
            m,
        ),
        effect_mean=gauge(
            "population_effect_mean", "Posterior mean of the population treatment effect.", m
        ),
        effect_q05=gauge(
            "population_effect_q05", "5% posterior quantile of the population effect.", m
        ),
        effect_q95=gauge(
            "population_effect_q95", "95% posterior quantile of the population effect.", m
        ),
        effect_sd_patients=gauge(
            "population_effect_sd_patients",
            "Posterior mean of the between-patient sd of the treatment effect.",
            m,
        ),
        effect_sd_cohorts=gauge(
            "population_effect_sd_cohorts",
            "Posterior mean of the between-cohort sd of the treatment effect.",
            m,
        ),
        effect_modifier=gauge(
            "effect_modifier",
            "Change of a patient's expected effect per unit of a covariate (or for a level "
            "against the reference), natural units; statistic: mean, q05, q95.",
            (*m, "covariate", "statistic"),
        ),
        drift_kl=gauge(
            "drift_kl_divergence",
            "KL(q_new || q_ref) from the reference posterior (last full rescore), nats.",
            m,
        ),
        drift_shift=gauge(
            "drift_effect_shift_sd_units",
            "Population effect move since the reference posterior, in reference posterior sds.",
            m,
        ),
        drift_window_shift=gauge(
            "drift_window_shift_sd_units",
            "Recent-window minus all-time population effect, in combined posterior sds.",
            m,
        ),
        drift_conflict=gauge(
            "drift_conflict_statistic",
            "Prior-data conflict CUSUM over standardised posterior-predictive residuals.",
            m,
        ),
        drift_alerts=counter(
            "drift_alerts_total", "Drift alerts published, by detector kind.", ("measure", "kind")
        ),
        patients_by_classification=gauge(
            "patients",
            "Patients by current classification (this worker's partitions).",
            ("measure", "classification"),
        ),
        patients_tracked=gauge(
            "patients_tracked", "Patients with state in this worker's partitions."
        ),
        raw_backlog_records=gauge(
            "raw_backlog_records",
            "Input records waiting on this worker's raw partitions as of its latest batch "
            "(rescoring after a new posterior defers to a backlog of more than a batch).",
        ),
        group_lag_records=gauge(
            "group_lag_records",
            "Input records in the raw topics not yet committed by the worker's consumer group "
            "(all its workers), as of the latest poll (streams.group_backlog).",
        ),
        state_cache_lookups=counter(
            "state_cache_lookups_total",
            "Stored patient records the patients agent looked up, by whether it held them "
            "parsed (hit) or parsed them (miss).",
            ("result",),
        ),
        state_cache_bytes=gauge(
            "state_cache_bytes",
            "Memory the patients agent's parsed records are counted at (at most "
            "EFFICACY_STATE_CACHE_MB).",
        ),
        scores_published=counter(
            "scores_published_total", "Efficacy scores published.", ("trigger",)
        ),
        selection_elpd_diff=gauge(
            "selection_elpd_diff",
            "Cross-validated elpd of a structure minus the best structure's (<= 0), "
            "latest structure selection.",
            ("measure", "structure"),
        ),
        selection_elpd_diff_se=gauge(
            "selection_elpd_diff_se",
            "Standard error of efficacy_selection_elpd_diff (paired over held-out patients).",
            ("measure", "structure"),
        ),
        selection_chosen=gauge(
            "selection_chosen",
            "1 for the structure the latest selection chose, 0 for the other candidates.",
            ("measure", "structure"),
        ),
        selection_seconds=histogram(
            "selection_seconds",
            "Compute time of one structure selection (all folds and structures).",
            SELECTION_BUCKETS,
            m,
        ),
        selection_last_run=gauge(
            "selection_last_run_timestamp_seconds",
            "Unix time of the latest published structure selection.",
            m,
        ),
        selection_failures=counter(
            "selection_failures_total", "Structure selections that failed.", m
        ),
        joint_posteriors_thinned=counter(
            "joint_posteriors_thinned_total",
            "Joint posteriors over the topic's message limit, published with their draws "
            "thinned evenly to fit.",
            ("group",),
        ),
    )


def serve_metrics(registry: CollectorRegistry, port: int, addr: str = "127.0.0.1") -> WSGIServer:
    """Serve ``registry`` at ``http://addr:port/metrics`` from a daemon thread.

    ``port=0`` binds a free port; read it back from ``server.server_port``. Stop
    with ``server.shutdown(); server.server_close()``. In a container bind
    ``addr="0.0.0.0"`` so Prometheus can reach it.
    """
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server
