"""The collapsed streaming method against independent references (issue 3, items 3-6).

Tolerances come from the issue and are justified by Monte Carlo error:
- NUTS with 2000 draws has a Monte Carlo sd of ~0.03-0.1 posterior sd on a mean,
  so a true discrepancy of 0 shows as ≤ 0.1 at the median over 500 patients;
- coverage of 90% intervals over n = 2000 patients has binomial sd
  √(0.9·0.1/2000) = 0.0067, so 86-94% is ±6 sd (patients share θ, which
  correlates their errors, hence the wide band).
"""

from __future__ import annotations

import csv

import jax
import numpy as np
import pytest
from sleepstudy_reference import SLEEPSTUDY, assert_matches_lme4

from model.config import MeasureConfig, SVIConfig
from model.events import Events
from model.evidence import add_events, empty_stats, stats_from_events
from model.offline import fit_programme, model_config_for
from model.population import PopulationFitter, pad_evidence
from model.reference import fit_nuts
from model.scores import summarize_effects
from model.simulate import ProgrammeSpec, simulate

RHR = MeasureConfig(name="resting_heart_rate", unit="bpm", direction="lower", mcid=2.0)


@pytest.fixture(scope="module")
def programme():
    return simulate(ProgrammeSpec(num_patients=500, num_cohorts=20, obs_per_patient=30), seed=1)


@pytest.mark.slow
def test_collapsed_svi_matches_nuts_on_the_full_model(programme):
    """Item 3: 500 patients in 20 cohorts; NUTS on the non-collapsed model."""
    config = model_config_for(programme.events, time_trend=True, cohort_level=True)
    nuts = fit_nuts(programme.events, config, num_warmup=500, num_samples=2000, seed=2)
    assert nuts.diagnostics["divergences"] == 0
    result, svi = fit_programme(programme.events, RHR, seed=3)

    nuts_mean = nuts.patient_effect.mean(axis=0)
    nuts_sd = nuts.patient_effect.std(axis=0)
    standardized_error = np.abs(svi.mean - nuts_mean) / nuts_sd
    sd_ratio = svi.sd / nuts_sd
    assert np.median(standardized_error) <= 0.10
    assert 0.9 <= np.median(sd_ratio) <= 1.1
    effect = nuts.population["effect"]
    assert abs(result["population"]["effect"]["mean"] - effect.mean()) <= 0.2 * effect.std()


@pytest.mark.slow
def test_twenty_warm_updates_match_a_one_shot_fit(programme):
    """Item 4: evidence arrives in 20 batches (by event time); after the 20th
    warm-started update the posterior matches a one-shot fit on all data."""
    events = programme.events
    config = model_config_for(events, time_trend=True, cohort_level=True)
    cohort, num_cohorts = events.cohort_of_patient, events.num_cohorts
    fitter = PopulationFitter(config, SVIConfig())
    all_stats = stats_from_events(
        events.num_patients, events.patient, events.exposure, events.time, events.outcome, config
    )
    all_evidence = pad_evidence(all_stats, cohort, num_cohorts)
    one_shot, _ = fitter.update(
        fitter.init(jax.random.PRNGKey(0), all_evidence), all_evidence, jax.random.PRNGKey(1)
    )

    stats, state = empty_stats(events.num_patients, config), None
    for k, rows in enumerate(np.array_split(np.argsort(events.time, kind="stable"), 20)):
        stats = add_events(
            stats, events.patient[rows], events.exposure[rows], events.time[rows],
            events.outcome[rows], config,
        )  # fmt: skip
        evidence = pad_evidence(stats, cohort, num_cohorts)
        state = state or fitter.init(jax.random.PRNGKey(0), evidence)
        state, _info = fitter.update(state, evidence, jax.random.PRNGKey(100 + k))
    assert state.version == 20
    np.testing.assert_allclose(stats.gram, all_stats.gram, rtol=1e-9, atol=1e-9)

    key = jax.random.PRNGKey(7)
    reference = summarize_effects(
        fitter.draws(one_shot, key), stats.gram, cohort, num_cohorts, RHR, config
    )
    sequential = summarize_effects(
        fitter.draws(state, key), stats.gram, cohort, num_cohorts, RHR, config
    )
    assert np.median(np.abs(sequential.mean - reference.mean) / reference.sd) <= 0.10
    assert 0.9 <= np.median(sequential.sd / reference.sd) <= 1.1
    draws_one, draws_seq = fitter.draws(one_shot, key, 4000), fitter.draws(state, key, 4000)
    effect_one, effect_seq = np.asarray(draws_one.mu[:, 1]), np.asarray(draws_seq.mu[:, 1])
    assert abs(effect_seq.mean() - effect_one.mean()) <= 0.2 * effect_one.std()


@pytest.mark.slow
def test_ninety_percent_intervals_cover_true_effects():
    """Item 5: ≥ 2000 simulated patients over 4 seeds, with missing readings."""
    covered, total = 0, 0
    for seed in range(4):
        spec = ProgrammeSpec(
            num_patients=500, num_cohorts=10, obs_per_patient=12, missing_rate=0.2,
            design="crossover" if seed % 2 else "baseline_then_exposure",
        )  # fmt: skip
        sim = simulate(spec, seed=100 + seed)
        _, summary = fit_programme(sim.events, RHR, seed=seed)
        truth = sim.truth.effect
        covered += int(np.sum((summary.lower <= truth) & (truth <= summary.upper)))
        total += truth.size
    assert total >= 2000
    assert 0.86 <= covered / total <= 0.94


def _sleepstudy() -> tuple[Events, list[str]]:
    with (SLEEPSTUDY / "sleepstudy.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    subjects = list(dict.fromkeys(r["Subject"] for r in rows))
    index = {s: i for i, s in enumerate(subjects)}
    events = Events(
        patient=np.array([index[r["Subject"]] for r in rows]),
        cohort_of_patient=np.zeros(len(subjects), dtype=int),
        time=np.zeros(len(rows)),
        exposure=np.array([float(r["Days"]) for r in rows]),
        outcome=np.array([float(r["Reaction"]) for r in rows]),
    )
    return events, subjects


def test_sleepstudy_matches_lme4():
    """Item 6: published lme4 REML fit of lmer(Reaction ~ Days + (Days | Subject)):
    every subject's slope within half its conditional sd of lme4's conditional
    mode, the population slope within 0.25 SE (tests/sleepstudy_reference.py)."""
    events, subjects = _sleepstudy()
    measure = MeasureConfig(name="reaction_time", unit="ms", direction="lower", mcid=5.0)
    result, summary = fit_programme(events, measure, time_trend=False, cohort_level=False)
    assert_matches_lme4(subjects, summary.mean, result["population"]["effect"]["mean"])
    slope_sd = result["population"]["effect_sd_patients"]["mean"]
    assert 3.80 <= slope_sd <= 8.75  # lme4's profile 95% interval
