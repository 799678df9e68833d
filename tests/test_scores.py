"""Mixture summaries against independent numerics; the decision rule's table."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize
from scipy import stats as sps

from model.config import DecisionRule, MeasureConfig, ModelConfig, Standardization
from model.evidence import stats_from_events
from model.likelihood import Hyper
from model.scores import (
    QUANTILE_TOLERANCE,
    Classification,
    classify,
    mixture_quantiles,
    summarize_effects,
)

jax.config.update("jax_enable_x64", True)


def test_mixture_quantiles_match_root_finding_on_the_mixture_cdf():
    """Within QUANTILE_TOLERANCE of the smallest component sd of brentq's root
    (the bound mixture_quantiles proves before it stops)."""
    rng = np.random.default_rng(0)
    means = rng.normal(0.0, 2.0, (7, 5))
    sds = rng.uniform(0.2, 1.5, (7, 5))
    probs = np.array([0.05, 0.5, 0.95])
    got = np.asarray(mixture_quantiles(jnp.asarray(means), jnp.asarray(sds), jnp.asarray(probs)))
    for p_index, p in enumerate(probs):
        for j in range(5):
            cdf = lambda q, j=j, p=p: sps.norm.cdf(q, means[:, j], sds[:, j]).mean() - p  # noqa: E731
            expected = optimize.brentq(cdf, -50, 50, xtol=1e-12)
            bound = QUANTILE_TOLERANCE * sds[:, j].min() + 1e-12
            assert got[p_index, j] == pytest.approx(expected, abs=bound)


@pytest.mark.parametrize("shape", ["narrow", "typical", "bimodal", "far_apart"])
def test_mixture_quantiles_converge_on_hard_mixtures(shape):
    """Safeguarded Newton against root finding on 400-component mixtures shaped
    like the scores' (narrow and typical), with two far modes (Newton alone
    would jump out of the bracket between them) and with components 40 sds
    apart (densities underflow between them), at central and extreme levels."""
    rng = np.random.default_rng(["narrow", "typical", "bimodal", "far_apart"].index(shape))
    draws, mixtures = 400, 40
    if shape == "narrow":
        means = rng.normal(0.0, 0.01, (draws, mixtures))
        sds = rng.uniform(0.9, 1.0, (draws, mixtures))
    elif shape == "typical":
        means = rng.normal(0.0, 0.3, (draws, mixtures))
        sds = rng.uniform(0.2, 1.0, (draws, mixtures))
    elif shape == "bimodal":
        means = rng.choice([-3.0, 3.0], (draws, mixtures)) + rng.normal(0.0, 0.1, (draws, mixtures))
        sds = rng.uniform(0.1, 0.5, (draws, mixtures))
    else:
        means = rng.choice([-20.0, 20.0], (draws, mixtures), p=[0.3, 0.7])
        sds = np.full((draws, mixtures), 0.5)
    probs = np.array([0.001, 0.05, 0.3, 0.5, 0.95, 0.999])
    got = np.asarray(mixture_quantiles(jnp.asarray(means), jnp.asarray(sds), jnp.asarray(probs)))
    for j in range(mixtures):
        for p_index, p in enumerate(probs):

            def excess(q, j=j, p=p):
                return sps.norm.cdf(q, means[:, j], sds[:, j]).mean() - p

            expected = optimize.brentq(excess, -60, 60, xtol=1e-13, rtol=1e-15)
            # F is flat between far modes: compare where F crosses p, not q itself.
            bound = QUANTILE_TOLERANCE * sds[:, j].min() + 1e-12
            assert got[p_index, j] == pytest.approx(expected, abs=bound) or (
                abs(excess(got[p_index, j])) < 1e-12
            ), (shape, j, p)


def _draws(num_draws: int, rng: np.random.Generator) -> Hyper:
    """A few θ draws around a fixed point (as from a narrow q)."""
    return Hyper(
        mu=jnp.asarray(np.array([0.0, -0.5]) + 0.05 * rng.normal(size=(num_draws, 2))),
        tau=jnp.asarray(np.array([0.8, 0.4]) * np.exp(0.1 * rng.normal(size=(num_draws, 2)))),
        corr_chol=jnp.broadcast_to(jnp.eye(2), (num_draws, 2, 2)),
        tau_cohort=jnp.asarray(0.2 * np.exp(0.1 * rng.normal(size=num_draws))),
        sigma=jnp.asarray(0.5 * np.exp(0.05 * rng.normal(size=num_draws))),
        gamma=jnp.asarray(0.01 * rng.normal(size=(num_draws, 1))),
    )


def test_summaries_equal_monte_carlo_of_the_mixture_and_honour_direction():
    rng = np.random.default_rng(1)
    config = ModelConfig(standardization=Standardization(outcome_scale=4.0, exposure_scale=1.0))
    num_patients = 6
    patient = np.repeat(np.arange(num_patients), 8)
    exposure = np.tile((np.arange(8) >= 4).astype(float), num_patients)
    time = np.tile(np.arange(8.0), num_patients)
    outcome = rng.normal(0.0, 4.0, patient.size) - 2.0 * exposure
    stats = stats_from_events(num_patients, patient, exposure, time, outcome, config)
    cohort = np.array([0, 0, 1, 1, 2, 2])
    draws = _draws(64, rng)
    lower_better = MeasureConfig(name="m", unit="u", direction="lower", mcid=1.0)
    higher_better = lower_better.model_copy(update={"direction": "higher"})
    low = summarize_effects(draws, stats.gram, cohort, 3, lower_better, config, block=4)
    high = summarize_effects(draws, stats.gram, cohort, 3, higher_better, config, block=4)

    # Monte Carlo of the same mixture, component by component (independent of the
    # closed-form moments and the bisection).
    from model.likelihood import patient_effects_given_theta
    from model.scores import cohort_posteriors

    u_mean, u_var = cohort_posteriors(
        draws, jnp.asarray(stats.gram), jnp.asarray(cohort), 3, config
    )
    comps = jax.vmap(patient_effects_given_theta, in_axes=(0, None, 0, 0, None))(
        draws, jnp.asarray(stats.gram), u_mean[:, cohort], u_var[:, cohort], config
    )
    m, s = np.asarray(comps.mean) * 4.0, np.sqrt(np.asarray(comps.variance)) * 4.0
    samples = m[None] + s[None] * rng.standard_normal((4000, *m.shape))
    samples = samples.reshape(-1, num_patients)
    mc_se = samples.std(axis=0) / np.sqrt(samples.shape[0] / 64)  # conservative: per-draw blocks
    np.testing.assert_allclose(low.mean, samples.mean(axis=0), atol=float(4 * mc_se.max()))
    np.testing.assert_allclose(low.sd, samples.std(axis=0), rtol=0.03)
    np.testing.assert_allclose(low.lower, np.quantile(samples, 0.05, axis=0), atol=0.05)
    np.testing.assert_allclose(low.upper, np.quantile(samples, 0.95, axis=0), atol=0.05)
    np.testing.assert_allclose(low.p_benefit_ge_mcid, (-samples >= 1.0).mean(axis=0), atol=0.01)
    np.testing.assert_allclose(high.p_benefit_ge_mcid, (samples >= 1.0).mean(axis=0), atol=0.01)
    np.testing.assert_allclose(low.p_benefit_gt_0 + high.p_benefit_gt_0, 1.0, atol=1e-12)
    np.testing.assert_allclose(
        low.population_effect + low.cohort_deviation + low.individual_deviation, low.mean
    )
    assert np.all((low.shrinkage > 0) & (low.shrinkage < 1))


def test_summaries_in_low_precision_stay_within_a_millionth_of_the_float64_mixture():
    """Scores evaluate the mixture CDF in MIXTURE_DTYPE (float32). Against the
    same 400-component mixtures in float64 (scipy: brentq on the CDF, and the
    probabilities summed directly), the interval ends stay within 1e-6 of the
    mixture sd and the probabilities within 1e-6: far below the Monte Carlo
    error of the mixture itself (~1/sqrt(400) of its spread)."""
    from model.likelihood import patient_effects_given_theta
    from model.scores import cohort_posteriors

    rng = np.random.default_rng(7)
    config = ModelConfig(standardization=Standardization(outcome_scale=4.0, exposure_scale=1.0))
    num_patients = 40
    counts = rng.integers(3, 30, num_patients)
    patient = np.repeat(np.arange(num_patients), counts)
    exposure = (rng.uniform(size=patient.size) < 0.5).astype(float)
    time = rng.uniform(0.0, 60.0, patient.size)
    effect = rng.normal(-2.0, 3.0, num_patients)[patient]
    outcome = rng.normal(0.0, 4.0, patient.size) + effect * exposure
    stats = stats_from_events(num_patients, patient, exposure, time, outcome, config)
    cohort = rng.integers(0, 4, num_patients)
    draws = _draws(400, rng)
    measure = MeasureConfig(name="m", unit="u", direction="lower", mcid=1.0)
    got = summarize_effects(draws, stats.gram, cohort, 4, measure, config, block=16)

    u_mean, u_var = cohort_posteriors(draws, jnp.asarray(stats.gram), jnp.asarray(cohort), 4,
                                      config)  # fmt: skip
    comps = jax.vmap(patient_effects_given_theta, in_axes=(0, None, 0, 0, None))(
        draws, jnp.asarray(stats.gram), u_mean[:, cohort], u_var[:, cohort], config
    )
    m, s = np.asarray(comps.mean) * 4.0, np.sqrt(np.asarray(comps.variance)) * 4.0

    def excess(q: float, j: int, p: float) -> float:
        return sps.norm.cdf(q, m[:, j], s[:, j]).mean() - p

    for j in range(num_patients):
        lower = optimize.brentq(excess, -200, 200, args=(j, 0.05), xtol=1e-12)
        upper = optimize.brentq(excess, -200, 200, args=(j, 0.95), xtol=1e-12)
        assert abs(got.lower[j] - lower) <= 1e-6 * got.sd[j]
        assert abs(got.upper[j] - upper) <= 1e-6 * got.sd[j]
        assert got.p_benefit_ge_mcid[j] == pytest.approx(
            sps.norm.cdf((-m[:, j] - 1.0) / s[:, j]).mean(), abs=1e-6
        )
        assert got.p_benefit_gt_0[j] == pytest.approx(
            sps.norm.cdf(-m[:, j] / s[:, j]).mean(), abs=1e-6
        )


@pytest.mark.parametrize(
    ("p_mcid", "p_zero", "exposed", "unexposed", "expected"),
    [
        (0.95, 0.99, 5, 5, Classification.RESPONDER),
        (0.80, 0.99, 5, 5, Classification.RESPONDER),
        (0.79, 0.99, 5, 5, Classification.UNCERTAIN),
        (0.01, 0.20, 5, 5, Classification.NON_RESPONDER),
        (0.01, 0.21, 5, 5, Classification.UNCERTAIN),
        (0.99, 0.99, 2, 5, Classification.INSUFFICIENT_DATA),
        (0.01, 0.01, 5, 0, Classification.INSUFFICIENT_DATA),
    ],
)
def test_default_decision_rule(p_mcid, p_zero, exposed, unexposed, expected):
    got = classify(
        np.array([p_mcid]),
        np.array([p_zero]),
        np.array([exposed]),
        np.array([unexposed]),
        DecisionRule(),
    )
    assert got[0] == expected.value
