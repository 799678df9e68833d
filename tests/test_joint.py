"""The joint model's collapsed likelihood and patient posteriors against dense
brute force, and its configuration checks.

Brute force: the joint Gaussian of every reading of every measure of every
patient written out (mean Wμ + Zγ, covariance W Σ Wᵀ + diag σ²), its density by
scipy and the patient blocks' posterior by dense conditioning. Tiny random
problems, random θ, float64: agreement to rounding (1e-8).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps

from model.config import ModelConfig
from model.events import Events
from model.joint import (
    JointConfig,
    JointHyper,
    block_posterior,
    joint_config_for,
    joint_grams,
    joint_loglik,
    joint_patients,
)

jax.config.update("jax_enable_x64", True)


def random_problem(seed: int, measures: int, time_trend: bool):
    """A few patients with 0-4 readings of each measure (a patient may lack a
    measure, or have none at all) and a random θ (random full correlation)."""
    rng = np.random.default_rng(seed)
    count = int(rng.integers(2, 5))
    events = []
    for _ in range(measures):
        patient = np.repeat(np.arange(count), rng.integers(0, 5, count))
        events.append(
            Events(
                patient,
                np.zeros(count, dtype=int),
                rng.uniform(0.0, 10.0, patient.size),
                rng.integers(0, 2, patient.size) * rng.choice([1.0, 2.5], patient.size),
                rng.normal(50.0, 8.0, patient.size),
            )
        )
    config = joint_config_for(events, time_trend=time_trend)
    dim = 2 * measures
    loading = rng.normal(size=(dim, dim))
    corr = loading @ loading.T + dim * np.eye(dim) * rng.uniform(0.2, 1.0)
    corr = corr / np.sqrt(np.outer(np.diag(corr), np.diag(corr)))
    theta = JointHyper(
        mu=jnp.asarray(rng.normal(0.0, 1.0, (measures, 2))),
        tau=jnp.asarray(rng.uniform(0.1, 2.0, dim)),
        corr_chol=jnp.asarray(np.linalg.cholesky(corr)),
        sigma=jnp.asarray(rng.uniform(0.3, 2.0, measures)),
        gamma=jnp.asarray(rng.normal(0.0, 1.0, (measures, config.fixed_dim))),
    )
    return events, config, theta, count


def dense_reference(events, config: JointConfig, theta: JointHyper, count: int):
    """Standardised readings y, their marginal mean and covariance, and the
    cross-covariance with every patient's block r (P·D)."""
    dim = config.block_dim
    mu = np.asarray(theta.mu).reshape(-1)
    chol = np.asarray(theta.tau)[:, None] * np.asarray(theta.corr_chol)
    sigma_r = chol @ chol.T
    rows, y, noise, mean = [], [], [], []
    for m, (each, measure) in enumerate(zip(events, config.measures, strict=True)):
        y_m, x_m, t_m = measure.standardization.apply(each.outcome, each.exposure, each.time)
        for k in range(y_m.size):
            design = np.zeros(count * dim)  # reading = design · (all patients' blocks)
            base = each.patient[k] * dim + 2 * m
            design[base], design[base + 1] = 1.0, x_m[k]
            rows.append(design)
            y.append(y_m[k])
            noise.append(float(theta.sigma[m]) ** 2)
            trend = float(theta.gamma[m, 0]) * t_m[k] if config.fixed_dim else 0.0
            mean.append(design @ np.tile(mu, count) + trend)
    design = np.asarray(rows)
    prior = np.kron(np.eye(count), sigma_r)
    cov_y = design @ prior @ design.T + np.diag(noise)
    return np.asarray(y), np.asarray(mean), cov_y, prior @ design.T, prior


@pytest.mark.parametrize("measures", [2, 3])
@pytest.mark.parametrize("time_trend", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_collapsed_likelihood_and_posteriors_equal_dense(measures, time_trend, seed):
    events, config, theta, count = random_problem(seed, measures, time_trend)
    gram = jnp.asarray(joint_grams(events, config))
    y, mean, cov_y, cross, prior = dense_reference(events, config, theta, count)

    expected = sps.multivariate_normal(mean, cov_y).logpdf(y)
    assert float(joint_loglik(theta, gram, config)) == pytest.approx(expected, rel=1e-9, abs=1e-9)

    # r | y ~ N(μ + Cov(r, y) Cov(y)⁻¹ (y − E y), Σ − Cov(r, y) Cov(y)⁻¹ Cov(y, r))
    gain = np.linalg.solve(cov_y, cross.T).T
    dim = config.block_dim
    post_mean = np.tile(np.asarray(theta.mu).reshape(-1), count) + gain @ (y - mean)
    post_cov = prior - gain @ cross.T
    got_mean, got_cov = block_posterior(theta, gram, config)
    np.testing.assert_allclose(got_mean, post_mean.reshape(count, dim), atol=1e-9)
    for i in range(count):
        block = slice(i * dim, (i + 1) * dim)
        np.testing.assert_allclose(got_cov[i], post_cov[block, block], atol=1e-9)


def test_padding_patients_contribute_nothing():
    events, config, theta, _ = random_problem(3, 3, True)
    gram = joint_grams(events, config)
    padded = np.concatenate([gram, np.zeros((5, *gram.shape[1:]))])
    assert float(joint_loglik(theta, jnp.asarray(padded), config)) == pytest.approx(
        float(joint_loglik(theta, jnp.asarray(gram), config)), abs=1e-10
    )


def test_unsupported_structure_is_refused():
    plain = ModelConfig(cohort_level=False, time_trend=False)
    with pytest.raises(ValueError, match="cohort level"):
        JointConfig(measures=(plain, plain.model_copy(update={"cohort_level": True})))
    with pytest.raises(ValueError, match="2-6 measures"):
        JointConfig(measures=(plain,))
    with pytest.raises(ValueError, match="time trend"):
        JointConfig(measures=(plain, plain.model_copy(update={"time_trend": True})))


def test_benefit_probabilities_equal_sampling_the_dense_posteriors():
    """P(s_m b_im ≥ t_m) and P(s_m b_im > 0) of joint_patients against draws of
    every patient's block from its dense posterior (dense_reference), under a
    mixture of three θ: 40,000 samples per θ and patient give a Monte Carlo sd
    ≤ 0.0015 on each probability, so 0.01 is over six of them."""
    events, config, _, count = random_problem(4, 3, False)
    thetas = [random_problem(seed, 3, False)[2] for seed in (5, 6, 7)]
    draws = JointHyper(*(jnp.stack(parts) for parts in zip(*thetas, strict=True)))
    signs = np.array([-1.0, 1.0, 1.0])
    thresholds = np.array([0.3, 0.0, 0.8])
    found = joint_patients(draws, joint_grams(events, config), config, signs, thresholds)

    rng = np.random.default_rng(0)
    dim, samples = config.block_dim, 40_000
    above = np.zeros((count, 3))
    positive = np.zeros((count, 3))
    for theta in thetas:
        y, mean, cov_y, cross, prior = dense_reference(events, config, theta, count)
        gain = np.linalg.solve(cov_y, cross.T).T
        post_mean = np.tile(np.asarray(theta.mu).reshape(-1), count) + gain @ (y - mean)
        post_cov = prior - gain @ cross.T
        for i in range(count):
            block = slice(i * dim, (i + 1) * dim)
            draws_i = rng.multivariate_normal(post_mean[block], post_cov[block, block], samples)
            benefit = draws_i[:, 1::2] * signs
            above[i] += (benefit >= thresholds).mean(axis=0) / len(thetas)
            positive[i] += (benefit > 0).mean(axis=0) / len(thetas)
    np.testing.assert_allclose(found.p_benefit_ge_mcid, above, atol=0.01)
    np.testing.assert_allclose(found.p_benefit_gt_0, positive, atol=0.01)
