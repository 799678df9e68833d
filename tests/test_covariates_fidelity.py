"""Who it works for: patient covariates (effect modifiers), a time-varying
covariate confounded with exposure and partial adherence, the collapsed fit
against numpyro NUTS on the model with every patient effect sampled (issue 15).

The simulated programme (model.simulate) has a continuous modifier (age: the
benefit shrinks with age), a categorical one (group 1 benefits more), a
time-varying covariate that rises with exposure (so leaving it out would bias
the effect) and doses uniform in [0.4, 1] while exposed.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from model.config import MeasureConfig, SVIConfig
from model.evidence import events_stats
from model.offline import fit_programme, model_config_for, population_quantities
from model.population import PopulationFitter, pad_evidence
from model.reference import fit_nuts
from model.scores import summarize_effects
from model.simulate import ProgrammeSpec, simulate

RHR = MeasureConfig(name="resting_heart_rate", unit="bpm", direction="lower", mcid=2.0)
MODIFIED = ProgrammeSpec(
    num_patients=240,
    num_cohorts=8,
    obs_per_patient=20,
    with_covariates=True,
    effect_per_year=0.12,
    intercept_per_year=0.3,
    group_effects=(-3.0,),
    time_covariate_effect=2.0,
    time_covariate_confounding=1.0,
    adherence_low=0.4,
)


@pytest.fixture(scope="module")
def modified():
    return simulate(MODIFIED, seed=11)


def _coefficient_draws(population: dict, config) -> dict[str, np.ndarray]:
    """Every coefficient's draws (natural units) by a readable name."""
    draws = {}
    for k, name in enumerate(config.covariates):
        draws[f"effect modifier {name}"] = population["coefficients"][:, 1, k]
        draws[f"intercept shift {name}"] = population["coefficients"][:, 0, k]
    for k, name in enumerate(config.time_covariates):
        draws[f"time covariate {name}"] = population["time_coefficients"][:, k]
    draws["population effect"] = population["effect"]
    return draws


@pytest.mark.slow
def test_covariate_model_matches_nuts(modified):
    """Collapsed SVI against NUTS (2 chains, patients centred) on the same model.

    Tolerances (as in test_fidelity's, by Monte Carlo error): coefficient means
    within 0.2 NUTS sd (NUTS mean MC sd ≤ 1/√ESS ≈ 0.03 sd at ESS ≥ 1 000, SVI's
    4 000 draws 0.016 sd); coefficient sd ratios 0.85-1.15 (relative MC sd of an
    sd at ESS 1 000 is 2%); patients: median |mean diff| / NUTS sd ≤ 0.10 and
    median sd ratio in 0.9-1.1.
    """
    events = modified.events
    config = model_config_for(events, time_trend=True, cohort_level=True)
    nuts = fit_nuts(
        events, config, num_warmup=500, num_samples=1000, num_chains=2,
        centred_patients=True, seed=2,
    )  # fmt: skip
    assert nuts.diagnostics["divergences"] == 0
    assert nuts.diagnostics["max_r_hat"] < 1.02

    covariates = config.standardization.covariates(events.covariates)
    stats = events_stats(events, config)
    evidence = pad_evidence(stats, events.cohort_of_patient, events.num_cohorts, covariates)
    fitter = PopulationFitter(config, SVIConfig())
    key_init, key_fit, key_draws, key_summary = jax.random.split(jax.random.PRNGKey(3), 4)
    state, _ = fitter.update(fitter.init(key_init, evidence), evidence, key_fit)
    svi = summarize_effects(
        fitter.draws(state, key_draws), stats.gram, events.cohort_of_patient,
        evidence.num_cohorts, RHR, config, covariates=covariates,
    )  # fmt: skip
    approximate = _coefficient_draws(
        population_quantities(fitter.draws(state, key_summary, 4000), config), config
    )
    reference = _coefficient_draws(nuts.population, config)
    for name, draws in reference.items():
        error = (approximate[name].mean() - draws.mean()) / draws.std()
        ratio = approximate[name].std() / draws.std()
        assert abs(error) <= 0.2, f"{name}: SVI mean {error:+.3f} NUTS sds from NUTS's"
        assert 0.85 <= ratio <= 1.15, f"{name}: SVI sd / NUTS sd = {ratio:.3f}"

    nuts_mean = nuts.patient_effect.mean(axis=0)
    nuts_sd = nuts.patient_effect.std(axis=0)
    median_error = np.median(np.abs(svi.mean - nuts_mean) / nuts_sd)
    median_ratio = np.median(svi.sd / nuts_sd)
    assert median_error <= 0.10, f"median patient |mean diff| / NUTS sd {median_error:.3f}"
    assert 0.9 <= median_ratio <= 1.1, f"median patient sd ratio {median_ratio:.3f}"


@pytest.mark.slow
def test_fit_recovers_the_modifiers_and_ignoring_the_confounder_biases_the_effect(modified):
    """Against the simulation's truth: each true coefficient lies in its 90%
    interval widened by nothing (one programme: a miss has probability 0.1 per
    coefficient, so the four together fail by chance with probability ≤ 0.34 —
    hence the fixed seed; the band is checked over many programmes by
    benchmarks/covariates.py). The population effect is per full dose. Leaving
    the confounded time-varying covariate out moves the effect estimate by more
    than 3 of its sds (the confounder's coefficient times its exposure slope)."""
    events, truth = modified.events, modified.truth
    result, _ = fit_programme(events, RHR, seed=1)
    config = model_config_for(events, time_trend=True, cohort_level=True)
    assert result["diagnostics"]["covariates"] == ["age", "group=1"]
    for row, name in zip(result["coefficients"], truth.covariate_names, strict=True):
        k = truth.covariate_names.index(name)
        for part, index in (("effect", 1), ("intercept", 0)):
            summary = row[part]
            assert summary["q05"] <= truth.coefficients[index, k] <= summary["q95"], (name, part)
    (activity,) = result["time_coefficients"]
    assert activity["q05"] <= truth.time_covariate_effect <= activity["q95"]

    # The population effect is the effect at the covariates' means in the data;
    # the truth's centre is age_mean and group 0: shift it to the data's centre.
    centre = np.asarray(config.standardization.covariate_location or events.covariates.mean(0))
    shift = (centre - np.array([MODIFIED.age_mean, 0.0])) @ truth.coefficients[1]
    effect = result["population"]["effect"]
    true_effect = truth.population_effect + shift
    assert abs(effect["mean"] - true_effect) <= 3 * effect["sd"]

    no_confounder = dataclasses.replace(events, time_covariates=None, time_covariate_names=())
    biased, _ = fit_programme(no_confounder, RHR, seed=1)
    moved = biased["population"]["effect"]["mean"] - effect["mean"]
    assert abs(moved) >= 3 * effect["sd"], f"dropping the confounder moved the effect {moved:.2f}"
