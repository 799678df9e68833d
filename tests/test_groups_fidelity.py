"""Crossed groupings (issue 15 item 7): clinics × genotype clusters, the
collapsed fit (every patient's and every group's effect integrated out) against
numpyro NUTS on the model with all of them sampled, and against the
simulation's truth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.infer import MCMC, NUTS

from model.config import MeasureConfig, SVIConfig
from model.evidence import stats_from_events
from model.offline import model_config_for, population_quantities
from model.population import PopulationFitter, hyper_from_sites, hyper_model, pad_evidence
from model.reference import fit_nuts
from model.scores import group_posteriors, summarize_effects
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


@pytest.fixture(scope="module")
def reference(crossed):
    """NUTS (2 chains × 1 000 draws, patients centred, group effects non-centred)
    on the model with every patient and group effect sampled."""
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
    return config, nuts, stats, evidence


def _compare(approximate: dict, reference: dict) -> dict[str, tuple[float, float]]:
    """(mean difference in reference sds, sd ratio) per quantity; printed."""
    result = {
        name: (
            float((approximate[name].mean() - draws.mean()) / draws.std()),
            float(approximate[name].std() / draws.std()),
        )
        for name, draws in reference.items()
    }
    for name, (error, ratio) in result.items():
        print(f"{name}: mean diff {error:+.3f} NUTS sd, sd ratio {ratio:.3f}")
    return result


@pytest.mark.slow
def test_collapsed_likelihood_under_nuts_matches_the_full_model(reference):
    """NUTS on θ alone with the collapsed likelihood (model.population.hyper_model:
    every patient and group effect integrated out) against NUTS on the full model:
    the same posterior if the collapse with crossed levels is exact. Both are MCMC,
    so only Monte Carlo error separates them: means within 0.15 NUTS sd (each
    mean's MC sd ≤ 1/√ESS ≈ 0.03 sd at ESS ≥ 1 000, so 0.15 is > 3 combined MC
    sds), sd ratios 0.9-1.1 (relative MC sd of an sd ≈ 2-3% each). Measured with
    longer runs (2 × 3 000 draws each): +0.07, +0.04, −0.02 sd; ratios 1.03, 1.04, 1.00.
    """
    config, nuts, _, evidence = reference
    mcmc = MCMC(
        NUTS(hyper_model), num_warmup=500, num_samples=1000, num_chains=2,
        chain_method="sequential", progress_bar=False,
    )  # fmt: skip
    mcmc.run(
        jax.random.PRNGKey(4), evidence.gram, evidence.cohort, evidence.num_cohorts,
        config.structure, None, evidence.groups, evidence.num_groups,
    )  # fmt: skip
    collapsed = population_quantities(hyper_from_sites(mcmc.get_samples(), config), config)
    for name, (error, ratio) in _compare(
        _level_draws(collapsed), _level_draws(nuts.population)
    ).items():
        assert abs(error) <= 0.15, f"{name}: collapsed mean {error:+.3f} NUTS sds from full's"
        assert 0.9 <= ratio <= 1.1, f"{name}: collapsed sd / full sd = {ratio:.3f}"


@pytest.mark.slow
def test_crossed_levels_match_nuts(crossed, reference):
    """Collapsed SVI against NUTS on the full model: 200 patients in 8 clinics × 5
    clusters.

    Tolerances (test_covariates_fidelity's, by Monte Carlo error): each level's
    sd and the population effect within 0.2 NUTS sd (NUTS mean MC sd ≤ 1/√ESS ≈
    0.03 sd at ESS ≥ 1 000, SVI's 4 000 draws 0.016 sd); patients: median |mean
    diff| / NUTS sd ≤ 0.10 and median sd ratio 0.9-1.1.

    The sd ratios of the hyperparameters get 0.75-1.2: q(θ) is Gaussian over the
    unconstrained θ, and with 5 clusters the population effect's spread grows
    with the clusters' sd (a scale mixture, heavier-tailed than any Gaussian),
    so q under-disperses it: measured 0.81-0.85 over SVI seeds 3-5 (with fresh
    steps and particles doubled too), against 0.95-1.00 for NUTS on the same
    collapsed likelihood (the test above): a limit of the Gaussian q, not of the
    collapse, that this band records rather than hides. The SVI fit here takes 2 000 steps of
    16 particles: the defaults' optimisation noise moved the clinics' sd mean by
    0.05-0.21 NUTS sd between seeds, these by 0.10-0.17.
    """
    config, nuts, stats, evidence = reference
    events = crossed.events
    fitter = PopulationFitter(config, SVIConfig(fresh_steps=2000, num_particles=16))
    key_init, key_fit, key_draws, key_summary = jax.random.split(jax.random.PRNGKey(3), 4)
    state, _ = fitter.update(fitter.init(key_init, evidence), evidence, key_fit)
    svi = summarize_effects(
        fitter.draws(state, key_draws), stats.gram, events.cohort_of_patient,
        evidence.num_cohorts, RHR, config, groups=events.groups, num_groups=evidence.num_groups,
    )  # fmt: skip
    approximate = _level_draws(
        population_quantities(fitter.draws(state, key_summary, 4000), config)
    )
    for name, (error, ratio) in _compare(approximate, _level_draws(nuts.population)).items():
        assert abs(error) <= 0.2, f"{name}: SVI mean {error:+.3f} NUTS sds from NUTS's"
        assert 0.75 <= ratio <= 1.2, f"{name}: SVI sd / NUTS sd = {ratio:.3f}"
    nuts_mean = nuts.patient_effect.mean(axis=0)
    nuts_sd = nuts.patient_effect.std(axis=0)
    median_error = np.median(np.abs(svi.mean - nuts_mean) / nuts_sd)
    median_ratio = np.median(svi.sd / nuts_sd)
    print(f"patients: median |mean diff| {median_error:.3f} NUTS sd, sd ratio {median_ratio:.3f}")
    assert median_error <= 0.10, f"median patient |mean diff| / NUTS sd {median_error:.3f}"
    assert 0.9 <= median_ratio <= 1.1, f"median patient sd ratio {median_ratio:.3f}"

    # Against the simulation's truth: the clusters' deviations (spread 2.5 bpm, each
    # known to ~0.6 bpm from ~40 patients) follow the simulated ones.
    group_mean, _ = group_posteriors(
        fitter.draws(state, key_draws), jnp.asarray(stats.gram),
        jnp.asarray(events.cohort_of_patient), evidence.num_cohorts, config.structure, None,
        jnp.asarray(events.groups), evidence.num_groups,
    )  # fmt: skip
    start = evidence.num_cohorts
    clusters = np.asarray(group_mean)[:, start : start + CROSSED.num_clusters].mean(axis=0)
    assert np.corrcoef(clusters, crossed.truth.cluster_effect)[0, 1] > 0.9
