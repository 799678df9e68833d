"""Crossed groupings (issue 15 item 7): clinics × genotype clusters, the
collapsed fit (every patient's and every group's effect integrated out) against
numpyro NUTS on the model with all of them sampled, and against the
simulation's truth.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from model.config import MeasureConfig, SVIConfig
from model.evidence import stats_from_events
from model.offline import model_config_for, population_quantities
from model.population import PopulationFitter, pad_evidence
from model.reference import fit_nuts
from model.scores import summarize_effects
from model.simulate import ProgrammeSpec, simulate

RHR = MeasureConfig(name="resting_heart_rate", unit="bpm", direction="lower", mcid=2.0)
CROSSED = ProgrammeSpec(
    num_patients=200,
    num_cohorts=8,
    obs_per_patient=20,
    cohort_effect_sd=1.5,
    num_clusters=5,
    cluster_effect_sd=2.5,
)


@pytest.fixture(scope="module")
def crossed():
    return simulate(CROSSED, seed=3)


def _level_draws(population: dict) -> dict[str, np.ndarray]:
    """Each level's effect sd and the population effect (raw units) by name."""
    return {
        "clinic sd": population["effect_sd_cohorts"],
        "cluster sd": population["effect_sd_groups"][:, 0],
        "population effect": population["effect"],
    }


@pytest.mark.slow
def test_crossed_levels_match_nuts(crossed):
    """Collapsed SVI against NUTS (2 chains, patients centred, group effects
    non-centred) on the same model: 200 patients in 8 clinics × 5 clusters.

    Tolerances (test_covariates_fidelity's, by Monte Carlo error): each level's
    sd and the population effect within 0.2 NUTS sd (NUTS mean MC sd ≤ 1/√ESS ≈
    0.03 sd at ESS ≥ 1 000, SVI's 4 000 draws 0.016 sd); their sd ratios
    0.8-1.2 (a relative MC sd of 2-3% per sd, and a Gaussian q over log τ may
    under-disperse the skewed sd of 5 clusters a little); patients: median |mean
    diff| / NUTS sd ≤ 0.10 and median sd ratio 0.9-1.1.
    """
    events = crossed.events
    config = model_config_for(events, time_trend=True, cohort_level=True)
    assert config.grouping_levels == ("cluster",)
    nuts = fit_nuts(
        events, config, num_warmup=500, num_samples=1000, num_chains=2,
        centred_patients=True, seed=2,
    )  # fmt: skip
    assert nuts.diagnostics["divergences"] == 0
    assert nuts.diagnostics["max_r_hat"] < 1.02

    stats = stats_from_events(
        events.num_patients, events.patient, events.exposure, events.time, events.outcome, config
    )
    evidence = pad_evidence(
        stats, events.cohort_of_patient, events.num_cohorts, None, events.groups, events.num_groups
    )
    fitter = PopulationFitter(config, SVIConfig())
    key_init, key_fit, key_draws, key_summary = jax.random.split(jax.random.PRNGKey(3), 4)
    state, _ = fitter.update(fitter.init(key_init, evidence), evidence, key_fit)
    svi = summarize_effects(
        fitter.draws(state, key_draws), stats.gram, events.cohort_of_patient,
        evidence.num_cohorts, RHR, config, groups=events.groups, num_groups=evidence.num_groups,
    )  # fmt: skip
    approximate = _level_draws(
        population_quantities(fitter.draws(state, key_summary, 4000), config)
    )
    reference = _level_draws(nuts.population)
    report = []
    for name, draws in reference.items():
        error = (approximate[name].mean() - draws.mean()) / draws.std()
        ratio = approximate[name].std() / draws.std()
        report.append(f"{name}: mean diff {error:+.3f} NUTS sd, sd ratio {ratio:.3f}")
    nuts_mean = nuts.patient_effect.mean(axis=0)
    nuts_sd = nuts.patient_effect.std(axis=0)
    median_error = np.median(np.abs(svi.mean - nuts_mean) / nuts_sd)
    median_ratio = np.median(svi.sd / nuts_sd)
    report.append(
        f"patients: median |mean diff| {median_error:.3f} NUTS sd, sd ratio {median_ratio:.3f}"
    )
    print("\n".join(report))
    for name, draws in reference.items():
        error = (approximate[name].mean() - draws.mean()) / draws.std()
        ratio = approximate[name].std() / draws.std()
        assert abs(error) <= 0.2, f"{name}: SVI mean {error:+.3f} NUTS sds from NUTS's"
        assert 0.8 <= ratio <= 1.2, f"{name}: SVI sd / NUTS sd = {ratio:.3f}"
    assert median_error <= 0.10, f"median patient |mean diff| / NUTS sd {median_error:.3f}"
    assert 0.9 <= median_ratio <= 1.1, f"median patient sd ratio {median_ratio:.3f}"
