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
