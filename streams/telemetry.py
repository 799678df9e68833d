"""What the agents report while they work, in one narrow interface.

Agents call these methods; ``Telemetry`` keeps running totals (the demo and the
tests read them from the worker's log) and forwards to the Prometheus metrics
of ``monitoring.metrics`` when they are attached. Never a patient id here.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING

from monitoring.metrics import CACHE_RESULTS

if TYPE_CHECKING:
    from monitoring.metrics import Metrics
    from streams.population_book import FitResult
    from streams.schemas import PopulationPosterior, StructureSelection

log = logging.getLogger(__name__)


class CallTally:
    """Each patient's latest published call of one measure, and how many
    patients hold each call (the classification gauge): kept up to date call
    by call, where recounting every patient the worker holds on every batch
    cost time in proportion to them. A call no patient holds any more stays at
    0 (its gauge is set to 0, not left at its last count)."""

    def __init__(self) -> None:
        self._calls: dict[str, str] = {}
        self.counts: Counter[str] = Counter()

    def update(self, calls: Mapping[str, str]) -> None:
        """The new calls of some patients (by patient id)."""
        for patient_id, call in calls.items():
            previous = self._calls.get(patient_id)
            if previous == call:
                continue
            if previous is not None:
                self.counts[previous] -= 1
            self.counts[call] += 1
            self._calls[patient_id] = call


class Telemetry:
    """``metrics``: a ``monitoring.metrics.Metrics`` (None: keep totals only)."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics
        self.accepted_by_source: Counter[str] = Counter()
        self.rejected_by_reason: Counter[tuple[str, str]] = Counter()
        self.rerouted_by_source: Counter[str] = Counter()
        self.replayed = 0
        self.published = 0
        self.batches = 0
        self.selections = 0
        self.max_loop_lag = 0.0
        self.joint_thinned: Counter[str] = Counter()  # by joint group
        self._structures: dict[str, set[str]] = {}  # compared by the latest selection
        self._cache_counted = (0, 0)  # the record cache's hits and misses counted so far

    def accepted(self, source: str, count: int = 1) -> None:
        self.accepted_by_source[source] += count
        if self.metrics is not None:
            self.metrics.events_accepted.labels(source=source).inc(count)

    def rejected(self, source: str, reason: str, count: int = 1) -> None:
        self.rejected_by_reason[(source, reason)] += count
        if self.metrics is not None:
            self.metrics.events_dead_lettered.labels(source=source, reason=reason).inc(count)

    def rerouted(self, source: str, count: int) -> None:
        """Records that arrived on another partition than their key's (a producer
        without Kafka's murmur2 partitioner), sent on to their key's partition."""
        self.rerouted_by_source[source] += count
        if self.metrics is not None:
            self.metrics.events_rerouted.labels(source=source).inc(count)

    def replays(self, count: int) -> None:
        self.replayed += count

    def tracked(self, patients: int) -> None:
        if self.metrics is not None:
            self.metrics.patients_tracked.set(patients)

    def state_cache(self, hits: int, misses: int, size_bytes: int) -> None:
        """The record cache's running totals (streams.patient_step.RecordCache)."""
        if self.metrics is not None:
            lookups = self.metrics.state_cache_lookups
            for result, total, counted in zip(
                CACHE_RESULTS, (hits, misses), self._cache_counted, strict=True
            ):
                lookups.labels(result=result).inc(total - counted)
            self.metrics.state_cache_bytes.set(size_bytes)
        self._cache_counted = (hits, misses)

    def raw_backlog(self, records: int) -> None:
        if self.metrics is not None:
            self.metrics.raw_backlog_records.set(records)

    def group_lag(self, records: int) -> None:
        if self.metrics is not None:
            self.metrics.group_lag_records.set(records)

    def classifications(self, measure: str, counts: Counter[str]) -> None:
        """Current number of this worker's patients per classification of ``measure``."""
        if self.metrics is not None:
            for classification, count in counts.items():
                self.metrics.patients_by_classification.labels(
                    measure=measure, classification=classification
                ).set(count)

    def batch(self, size: int, seconds: float) -> None:
        self.batches += 1
        if self.metrics is not None:
            self.metrics.batch_seconds.observe(seconds)

    def step_stages(self, cpu_seconds: Mapping[str, float]) -> None:
        """The CPU seconds of one step's stages (streams.patient_step.process_batch's
        ``times``)."""
        if self.metrics is not None:
            for stage, seconds in cpu_seconds.items():
                self.metrics.step_cpu_seconds.labels(stage=stage).inc(seconds)

    def event_to_score(self, latencies: list[float]) -> None:
        if self.metrics is not None:
            for latency in latencies:
                self.metrics.event_to_score_seconds.observe(max(latency, 0.0))

    def loop_lag(self, seconds: float) -> None:
        self.max_loop_lag = max(self.max_loop_lag, seconds)
        if self.metrics is not None:
            self.metrics.event_loop_lag_seconds.observe(max(seconds, 0.0))

    def scores_published(self, count: int, trigger: str) -> None:
        """``trigger``: "evidence" (new patient data) or "population" (new posterior)."""
        self.published += count
        if self.metrics is not None and count:
            self.metrics.scores_published.labels(trigger=trigger).inc(count)

    def drift(self, message: PopulationPosterior) -> None:
        """Drift statistics of a new population posterior (and its alert, if any)."""
        if self.metrics is None or not message.drift:
            return
        m, measure = self.metrics, message.measure
        m.drift_kl.labels(measure=measure).set(message.drift.get("kl", 0.0))
        m.drift_shift.labels(measure=measure).set(message.drift.get("shift", 0.0))
        if "window_shift" in message.drift:
            m.drift_window_shift.labels(measure=measure).set(message.drift["window_shift"])
        for kind in message.drift_kinds:
            m.drift_alerts.labels(measure=measure, kind=kind).inc()

    def conflict(self, measure: str, statistic: float, detected: bool) -> None:
        """The prior-data conflict CUSUM of this worker's readings of a measure."""
        if self.metrics is None:
            return
        self.metrics.drift_conflict.labels(measure=measure).set(statistic)
        if detected:
            self.metrics.drift_alerts.labels(measure=measure, kind="prior_data_conflict").inc()

    def population_updated(self, result: FitResult) -> None:
        message = result.message
        log.info(
            "population posterior %s v%d published (%d patients)",
            message.measure,
            message.version,
            message.num_patients,
        )
        if self.metrics is None:
            return
        m, measure = self.metrics, message.measure
        m.population_update_seconds.labels(measure=measure).observe(result.seconds)
        m.elbo.labels(measure=measure).set(message.elbo)
        m.svi_steps.labels(measure=measure).inc(message.svi_steps)
        m.population_version.labels(measure=measure).set(message.version)
        m.patients_in_population.labels(measure=measure).set(message.num_patients)
        m.population_last_update.labels(measure=measure).set(time.time())
        effect = message.summary["effect"]
        m.effect_mean.labels(measure=measure).set(effect.mean)
        m.effect_q05.labels(measure=measure).set(effect.lower)
        m.effect_q95.labels(measure=measure).set(effect.upper)
        for name, gauge in (
            ("effect_sd_patients", m.effect_sd_patients),
            ("effect_sd_cohorts", m.effect_sd_cohorts),
        ):
            if name in message.summary:
                gauge.labels(measure=measure).set(message.summary[name].mean)
        for row in message.coefficients:  # covariate names come from the catalogue
            for statistic, value in (
                ("mean", row.effect.mean),
                ("q05", row.effect.lower),
                ("q95", row.effect.upper),
            ):
                m.effect_modifier.labels(
                    measure=measure, covariate=row.covariate, statistic=statistic
                ).set(value)

    def selection_published(self, message: StructureSelection) -> None:
        """The latest structure selection of a measure: per structure its elpd
        difference to the best and that difference's se, and which was chosen.
        Structures of an earlier selection that this one did not compare (a
        cohort level needs two cohorts) lose their series."""
        self.selections += 1
        log.info(
            "structure selection %s: choice %s, best %s (%d patients, %d folds, %.1f s)",
            message.measure,
            message.choice,
            message.best,
            message.num_patients,
            message.num_folds,
            message.seconds,
        )
        if self.metrics is None:
            return
        m, measure = self.metrics, message.measure
        compared = {row.structure for row in message.structures}
        for stale in self._structures.get(measure, set()) - compared:
            for gauge in (m.selection_elpd_diff, m.selection_elpd_diff_se, m.selection_chosen):
                gauge.remove(measure, stale)
        self._structures[measure] = compared
        for row in message.structures:
            labels = {"measure": measure, "structure": row.structure}
            m.selection_elpd_diff.labels(**labels).set(row.elpd_diff)
            m.selection_elpd_diff_se.labels(**labels).set(row.diff_se)
            m.selection_chosen.labels(**labels).set(1.0 if row.structure == message.choice else 0.0)
        m.selection_seconds.labels(measure=measure).observe(message.seconds)
        m.selection_last_run.labels(measure=measure).set(time.time())

    def selection_failed(self, measure: str) -> None:
        if self.metrics is not None:
            self.metrics.selection_failures.labels(measure=measure).inc()

    def joint_posterior_thinned(self, group: str) -> None:
        """A joint group's posterior was published with fewer draws to fit the topic."""
        self.joint_thinned[group] += 1
        if self.metrics is not None:
            self.metrics.joint_posteriors_thinned.labels(group=group).inc()
