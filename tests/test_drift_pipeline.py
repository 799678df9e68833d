"""Drift of the population posterior, detected by the population agent's own
logic (pure: PopulationModel.fit + judge_drift, as the agent runs them), on
simulated programmes whose evidence arrives in event-time order (issue 5).

- A programme whose true population effect changes mid-stream (-4 -> +2 bpm per
  unit exposure, all patients at once) must raise a drift alert within a bounded
  number of events after the change; the alerting posterior asks every worker to
  republish every score (``rescore``).
- Stationary programmes over several seeds must raise few alerts. The detector's
  thresholds put a false alarm at ~0.05-0.2% per comparison under exact Bayes
  (monitoring.drift.DriftConfig); SVI noise adds some, so we allow at most one
  false alarm over all stationary comparisons.
"""

from __future__ import annotations

import numpy as np
import pytest

from model.evidence import add_events, empty_stats
from model.simulate import ProgrammeSpec, simulate
from monitoring.drift import DriftConfig, PosteriorShiftDetector
from streams.agents.population import judge_drift
from streams.catalogue import Catalogue
from streams.population_book import PopulationModel

BATCHES = 16
SPEC = ProgrammeSpec(
    num_patients=300, num_cohorts=6, obs_per_patient=24, effect=-4.0, effect_sd=2.0,
    cohort_effect_sd=0.5, time_trend=0.0,
)  # fmt: skip
MODEL = (
    Catalogue.load()
    .get("resting_heart_rate")
    .model_config_for(time_origin_days=0.0, time_scale_days=30.0, half_life_days=None)
)


def stream_posteriors(spec: ProgrammeSpec, seed: int):
    """Feed the programme in event-time order, one population update per batch.
    Yields (events so far, event time of the batch end, judged message)."""
    sim = simulate(spec, seed=seed)
    events = sim.events
    order = np.argsort(events.time, kind="stable")
    cohorts = [f"clinic-{g}" for g in range(events.num_cohorts)]
    stats = empty_stats(events.num_patients, MODEL)
    model = PopulationModel("resting_heart_rate", MODEL)
    detector = PosteriorShiftDetector.from_config(DriftConfig())
    seen = 0
    for rows in np.array_split(order, BATCHES):
        stats = add_events(
            stats, events.patient[rows], events.exposure[rows], events.time[rows],
            events.outcome[rows], MODEL,
        )  # fmt: skip
        seen += rows.size
        result = model.fit(stats, events.cohort_of_patient, cohorts)
        yield seen, float(events.time[rows].max()), judge_drift(detector, result.message), sim


@pytest.mark.slow
def test_a_mid_stream_change_of_the_population_effect_raises_a_drift_alert():
    spec = SPEC.model_copy(update={"effect_change_at": 0.5, "effect_after_change": 2.0})
    alerts = []
    change_time, change_events = None, None
    for seen, batch_end, message, sim in stream_posteriors(spec, seed=3):
        change_time = sim.truth.change_time
        if change_events is None and batch_end >= change_time:
            change_events = seen
        if message.drift_detected:
            alerts.append((seen, batch_end, message))
            assert message.rescore  # every worker republishes every score
    assert alerts, "no drift alert after the population effect changed"
    first_seen, first_time, first = alerts[0]
    assert first_time >= change_time, "an alert before the change is a false alarm"
    delay = first_seen - change_events
    total = SPEC.num_patients * SPEC.obs_per_patient
    print(f"drift alert {delay} events ({delay / total:.1%} of the programme) after the change; "
          f"shift {first.drift['shift']:+.2f} sd, KL {first.drift['kl']:.1f}")  # fmt: skip
    assert delay <= 0.25 * total


@pytest.mark.slow
def test_stationary_programmes_raise_few_alerts():
    comparisons, alarms = 0, 0
    for seed in (11, 12):
        for _, _, message, _ in stream_posteriors(SPEC, seed=seed):
            comparisons += 1
            alarms += message.drift_detected
    print(f"stationary: {alarms} alerts in {comparisons} posterior comparisons")
    assert alarms <= 1
