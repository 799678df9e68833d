"""Bernoulli and Poisson measures: the collapsed Laplace fit against numpyro NUTS
on the same model, not collapsed (model.reference.full_model with the family's
likelihood: every patient's and cohort's effects sampled, no approximation).

A simulated programme per family: 60 patients in 6 cohorts, 50 (Bernoulli) or 30
(Poisson, with exposures) readings each, half before exposure. NUTS: 1 chain,
500 warm-up, 500 draws (ESS of the worst hyperparameter 74-147; the patients'
effects mix better), so its own Monte Carlo error in a patient's posterior mean
is about sd/√150 ≈ 0.08 sd and in a patient's sd about 6%: the medians over 60
patients below are far steadier than either. Tolerances: median over patients of |mean difference| / NUTS sd
≤ 0.10, median sd ratio in [0.9, 1.1] with 90% of the patients' ratios in
[0.8, 1.2], the population effect (μ_b, link scale) within 0.2 NUTS sd.
Measured (seed 3): Bernoulli 0.041, median sd ratio 0.98, population 0.01 NUTS
sd; Poisson 0.049, 1.00, 0.08 NUTS sd.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from model.config import MeasureConfig
from model.offline import fit_programme, model_config_for
from model.reference import fit_nuts
from model.simulate import ProgrammeSpec, simulate_family

SPECS = {
    "bernoulli": ProgrammeSpec(
        num_patients=60, num_cohorts=6, obs_per_patient=50, intercept=-0.5, effect=0.8,
        intercept_sd=0.8, effect_sd=0.6, cohort_effect_sd=0.3, correlation=-0.2,
        baseline_fraction=0.5,
    ),
    "poisson": ProgrammeSpec(
        num_patients=60, num_cohorts=6, obs_per_patient=30, intercept=0.5, effect=-0.5,
        intercept_sd=0.6, effect_sd=0.4, cohort_effect_sd=0.2, correlation=-0.2,
        baseline_fraction=0.5,
    ),
}  # fmt: skip
LINK = {"bernoulli": "log_odds_ratio", "poisson": "log_rate_ratio"}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bernoulli", "poisson"])
def test_laplace_fit_matches_nuts_on_the_full_model(family):
    jax.config.update("jax_enable_x64", True)
    sim = simulate_family(SPECS[family], family, seed=3, offsets=family == "poisson")
    measure = MeasureConfig(
        name="outcome", unit="", mcid=0.2, family=family, effect_scale=LINK[family]
    )
    result, summary = fit_programme(sim.events, measure, time_trend=False, cohort_level=True)
    config = model_config_for(sim.events, time_trend=False, cohort_level=True, family=family)
    reference = fit_nuts(sim.events, config, num_warmup=500, num_samples=500, seed=0)
    assert reference.diagnostics["divergences"] == 0
    assert reference.diagnostics["min_n_eff"] > 50

    nuts_mean = reference.patient_effect.mean(axis=0)
    nuts_sd = reference.patient_effect.std(axis=0, ddof=1)
    gap = np.abs(summary.mean - nuts_mean) / nuts_sd
    ratio = summary.sd / nuts_sd
    assert np.median(gap) <= 0.10, np.median(gap)
    assert 0.9 <= np.median(ratio) <= 1.1, np.median(ratio)
    assert np.mean((ratio >= 0.8) & (ratio <= 1.2)) >= 0.9
    population = reference.population["effect"]
    shift = abs(result["population"]["effect"]["mean"] - population.mean()) / population.std()
    assert shift <= 0.2, shift
