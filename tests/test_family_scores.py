"""Scores of binary and count measures on their declared scales
(model.family_scores) against the link-scale mixture they are derived from and,
for the nonlinear risk difference, against Gauss-Hermite quadrature."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import expit

from model.config import MeasureConfig, ModelConfig
from model.family_scores import local_posteriors, summarize_family_effects
from model.likelihood import Hyper

jax.config.update("jax_enable_x64", True)
CONFIG = ModelConfig(time_trend=False, family="bernoulli")


def problem(num_draws: int = 6):
    """Draws of θ around a plausible point and 5 patients' cells (2 cohorts)."""
    rng = np.random.default_rng(0)
    draws = Hyper(
        mu=jnp.asarray(rng.normal([-0.4, 0.6], 0.1, (num_draws, 2))),
        tau=jnp.asarray(rng.uniform(0.4, 0.8, (num_draws, 2))),
        corr_chol=jnp.broadcast_to(jnp.eye(2), (num_draws, 2, 2)),
        tau_cohort=jnp.asarray(rng.uniform(0.1, 0.3, num_draws)),
        sigma=jnp.ones(num_draws),
        gamma=jnp.zeros((num_draws, 0)),
    )
    trials = rng.integers(5, 25, (5, 2)).astype(float)
    events = np.floor(trials * rng.uniform(0.1, 0.9, (5, 2)))
    cells = np.stack([trials[:, 0], events[:, 0], trials[:, 1], events[:, 1], 0 * trials[:, 0]], -1)
    return draws, cells, np.array([0, 0, 1, 1, 0])


def summary(scale: str, mcid: float, direction: str = "higher"):
    draws, cells, cohort = problem()
    measure = MeasureConfig(
        name="symptom", unit="", mcid=mcid, direction=direction, family="bernoulli",
        effect_scale=scale,
    )  # fmt: skip
    return summarize_family_effects(draws, cells, cohort, 2, measure, CONFIG)


@pytest.mark.parametrize("direction", ["higher", "lower"])
def test_odds_ratio_is_the_link_mixture_exponentiated(direction):
    """Quantiles map through exp; P(benefit ≥ MCID) on the ratio is the link
    scale's P(sign·b ≥ log MCID); the mean is the log-normal mixture's."""
    link = summary("log_odds_ratio", np.log(1.5), direction)
    ratio = summary("odds_ratio", 1.5, direction)
    np.testing.assert_allclose(ratio.lower, np.exp(link.lower), rtol=1e-5)
    np.testing.assert_allclose(ratio.upper, np.exp(link.upper), rtol=1e-5)
    np.testing.assert_allclose(ratio.p_benefit_ge_mcid, link.p_benefit_ge_mcid, atol=1e-6)
    np.testing.assert_allclose(ratio.p_benefit_gt_0, link.p_benefit_gt_0, atol=1e-6)
    assert np.all(ratio.mean > np.exp(link.mean))  # Jensen: E[e^b] > e^E[b]
    if direction == "lower":  # a benefit is an odds ratio below 1
        assert np.all(link.p_benefit_gt_0 < 0.5)


def test_risk_difference_against_quadrature():
    """The Monte Carlo mean of logit⁻¹(a + b) − logit⁻¹(a) over the mixture
    (32 draws per component, 6 components: 192 per patient) against 40×40
    Gauss-Hermite quadrature of each component: within 4 Monte Carlo se."""
    draws, cells, cohort = problem()
    post, _ = local_posteriors(draws, jnp.asarray(cells), jnp.asarray(cohort), 2, CONFIG)
    nodes, weights = np.polynomial.hermite_e.hermegauss(40)
    weights = weights / weights.sum()
    z0, z1 = np.meshgrid(nodes, nodes, indexing="ij")
    w = np.outer(weights, weights)
    exact = []
    for i in range(cells.shape[0]):
        values = []
        for s in range(6):
            var0, cov01, var1 = (
                float(np.asarray(x)[s, i]) for x in (post.var0, post.cov01, post.var1)
            )
            chol = np.linalg.cholesky([[var0, cov01], [cov01, var1]])
            a = float(post.mean0[s, i]) + chol[0, 0] * z0
            b = float(post.mean1[s, i]) + chol[1, 0] * z0 + chol[1, 1] * z1
            values.append(np.sum(w * (expit(a + b) - expit(a))))
        exact.append(np.mean(values))
    result = summary("risk_difference", 0.05)
    se = result.sd / np.sqrt(6 * 32)
    np.testing.assert_array_less(np.abs(result.mean - np.array(exact)), 4 * se)
    assert np.all((result.lower < result.mean) & (result.mean < result.upper))
    assert np.all(result.p_benefit_ge_mcid <= result.p_benefit_gt_0)


@pytest.mark.parametrize(
    ("family", "scale", "mcid"),
    [("bernoulli", "odds_ratio", 1.5), ("bernoulli", "risk_difference", 0.05),
     ("poisson", "rate_ratio", 1.25)],
)  # fmt: skip
def test_scoring_with_published_cohort_posteriors_equals_the_joint_summary(family, scale, mcid):
    """The stream scores a patient from the cohort posteriors the population
    agent publishes (family_cohort_posteriors) and the patient's own cells
    (summarize_family_given_shifts): the same numbers as the offline summary of
    all patients at once (summarize_family_effects), whose joint mode puts each
    patient at its conditional mode given its cohort's posterior mean. 40
    patients in 3 cohorts with uneven data; the only difference is the
    convergence of the damped Newton searches (tolerance 1e-4 on probabilities
    and the link scale). The risk difference shares its Monte Carlo draws
    (same seed), so it is compared at the same tolerance."""
    from model.family_scores import family_cohort_posteriors, summarize_family_given_shifts

    rng = np.random.default_rng(4)
    num_draws = 5
    draws = Hyper(
        mu=jnp.asarray(rng.normal([-0.5, 0.5], 0.1, (num_draws, 2))),
        tau=jnp.asarray(rng.uniform(0.3, 0.7, (num_draws, 2))),
        corr_chol=jnp.broadcast_to(jnp.eye(2), (num_draws, 2, 2)),
        tau_cohort=jnp.asarray(rng.uniform(0.2, 0.4, num_draws)),
        sigma=jnp.ones(num_draws),
        gamma=jnp.zeros((num_draws, 0)),
    )
    cohort = rng.integers(0, 3, 40)
    n = rng.integers(0, 30, (40, 2)).astype(float)
    rate = np.exp(-0.5 + np.array([0.0, 0.6]))
    if family == "bernoulli":
        events = rng.binomial(n.astype(int), rate / (1 + rate)).astype(float)
    else:
        events = rng.poisson(n * rate).astype(float)
    cells = np.stack([n[:, 0], events[:, 0], n[:, 1], events[:, 1], np.zeros(40)], -1)
    config = ModelConfig(time_trend=False, family=family)
    measure = MeasureConfig(
        name="m", unit="", mcid=mcid, direction="higher", family=family, effect_scale=scale
    )
    joint = summarize_family_effects(draws, cells, cohort, 3, measure, config)
    cohort_mean, cohort_var = family_cohort_posteriors(
        draws, jnp.asarray(cells), jnp.asarray(cohort, dtype=np.int32), 3, config.structure
    )
    cohort_mean, cohort_var = np.asarray(cohort_mean), np.asarray(cohort_var)
    assert np.all(cohort_var > 0) and np.all(
        cohort_var < np.asarray(draws.tau_cohort)[:, None] ** 2
    )
    given = summarize_family_given_shifts(
        draws, cells, cohort_mean[:, cohort], cohort_var[:, cohort], measure, config
    )
    for field in ("mean", "sd", "lower", "upper", "p_benefit_ge_mcid", "p_benefit_gt_0"):
        np.testing.assert_allclose(
            getattr(given, field), getattr(joint, field), atol=1e-4, rtol=1e-4, err_msg=field
        )
    np.testing.assert_allclose(given.shrinkage, joint.shrinkage, atol=1e-4)
