"""The collapsed likelihood and patient posteriors against dense brute force.

Brute force: write the joint Gaussian of every observation, patient effect and
cohort deviation explicitly, then take the marginal density of y (scipy) and
condition on y (dense linear algebra). Tiny random problems, random θ, float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps

from model.config import ModelConfig
from model.evidence import stats_from_events
from model.likelihood import (
    Hyper,
    cohort_effect_posterior,
    collapsed_loglik,
    patient_effects_given_theta,
)

jax.config.update("jax_enable_x64", True)


def random_problem(seed: int, config: ModelConfig):
    rng = np.random.default_rng(seed)
    num_cohorts = int(rng.integers(1, 4))
    cohort = rng.integers(0, num_cohorts, int(rng.integers(2, 6)))
    counts = rng.integers(0, 6, cohort.size)  # a patient may have no data
    patient = np.repeat(np.arange(cohort.size), counts)
    exposure = rng.integers(0, 2, patient.size) * rng.choice([1.0, 2.5], patient.size)
    time = rng.uniform(-1.0, 1.0, patient.size)
    outcome = rng.normal(0.0, 2.0, patient.size)
    rho = rng.uniform(-0.9, 0.9)
    theta = Hyper(
        mu=jnp.asarray(rng.normal(0.0, 1.0, 2)),
        tau=jnp.asarray(rng.uniform(0.1, 2.0, 2)),
        corr_chol=jnp.asarray([[1.0, 0.0], [rho, np.sqrt(1.0 - rho**2)]]),
        tau_cohort=jnp.asarray(rng.uniform(0.05, 1.5)),
        sigma=jnp.asarray(rng.uniform(0.3, 2.0)),
        gamma=jnp.asarray(rng.normal(0.0, 1.0, config.fixed_dim)),
    )
    return cohort, num_cohorts, patient, exposure, time, outcome, theta


def dense_joint(cohort, patient, exposure, time, theta, config):
    """Mean and covariance of (y, b) where b stacks every patient's effect."""
    theta = jax.tree.map(np.asarray, theta)
    n, num_patients = patient.size, cohort.size
    chol = theta.tau[:, None] * theta.corr_chol
    sigma_r = chol @ chol.T
    # Latent vector: (r_1, ..., r_P, u_1, ..., u_G), prior mean (μ, ..., μ, 0, ...).
    num_cohorts = int(cohort.max()) + 1
    dim = 2 * num_patients + num_cohorts
    prior_mean = np.concatenate([np.tile(theta.mu, num_patients), np.zeros(num_cohorts)])
    prior_cov = np.zeros((dim, dim))
    for i in range(num_patients):
        prior_cov[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] = sigma_r
    tau_u = float(theta.tau_cohort) if config.cohort_level else 0.0
    for g in range(num_cohorts):
        prior_cov[2 * num_patients + g, 2 * num_patients + g] = tau_u**2
    # r_i = μ + e_b u_g + η_i  ->  latent effect loads on u through a linear map.
    to_effects = np.eye(dim)
    for i in range(num_patients):
        to_effects[2 * i + 1, 2 * num_patients + cohort[i]] = 1.0
    latent_mean = to_effects @ prior_mean
    latent_cov = to_effects @ prior_cov @ to_effects.T
    design = np.zeros((n, dim))
    for row in range(n):
        i = patient[row]
        design[row, 2 * i] = 1.0
        design[row, 2 * i + 1] = exposure[row]
    fixed = time[:, None] @ np.atleast_1d(theta.gamma)[None, :] if config.time_trend else 0.0
    fixed = np.sum(fixed, axis=-1) if config.time_trend else np.zeros(n)
    y_mean = design @ latent_mean + fixed
    y_cov = design @ latent_cov @ design.T + float(theta.sigma) ** 2 * np.eye(n)
    cross = latent_cov @ design.T  # Cov(latent, y)
    return y_mean, y_cov, latent_mean, latent_cov, cross


CASES = [
    ModelConfig(),
    ModelConfig(time_trend=False),
    ModelConfig(cohort_level=False),
]


@pytest.mark.parametrize("config", CASES, ids=["full", "no-trend", "no-cohort"])
@pytest.mark.parametrize("seed", range(12))
def test_collapsed_loglik_equals_dense_marginal(config, seed):
    cohort, num_cohorts, patient, exposure, time, outcome, theta = random_problem(seed, config)
    stats = stats_from_events(cohort.size, patient, exposure, time, outcome, config)
    collapsed = collapsed_loglik(
        theta, jnp.asarray(stats.gram), jnp.asarray(cohort), num_cohorts, config
    )
    if patient.size == 0:
        assert float(collapsed) == 0.0
        return
    y_mean, y_cov, *_ = dense_joint(cohort, patient, exposure, time, theta, config)
    dense = sps.multivariate_normal(y_mean, y_cov).logpdf(outcome)
    assert abs(float(collapsed) - dense) <= 1e-8 * max(1.0, abs(dense))


@pytest.mark.parametrize("config", CASES, ids=["full", "no-trend", "no-cohort"])
@pytest.mark.parametrize("seed", range(12))
def test_patient_effect_posterior_equals_dense_conditioning(config, seed):
    cohort, num_cohorts, patient, exposure, time, outcome, theta = random_problem(seed, config)
    stats = stats_from_events(cohort.size, patient, exposure, time, outcome, config)
    gram = jnp.asarray(stats.gram)
    u_mean, u_var = cohort_effect_posterior(theta, gram, jnp.asarray(cohort), num_cohorts, config)
    result = patient_effects_given_theta(theta, gram, u_mean[cohort], u_var[cohort], config)
    y_mean, y_cov, latent_mean, latent_cov, cross = dense_joint(
        cohort, patient, exposure, time, theta, config
    )
    if patient.size:
        gain = np.linalg.solve(y_cov, cross.T).T
        post_mean = latent_mean + gain @ (outcome - y_mean)
        post_cov = latent_cov - gain @ cross.T
    else:
        post_mean, post_cov = latent_mean, latent_cov
    effect = 2 * np.arange(cohort.size) + 1
    np.testing.assert_allclose(result.mean, post_mean[effect], rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(result.variance, np.diag(post_cov)[effect], rtol=1e-8, atol=1e-9)


def test_forgetting_is_a_power_likelihood():
    """With forgetting, each observation's log-density term is weighted by ω: for a
    single patient with known effects integrated out, the collapsed likelihood
    equals the dense marginal with noise variance σ²/ω plus the ½Σlog ω
    correction that turns N(y; ., σ²/ω) into the power likelihood ω·log N(y; ., σ²)."""
    config = ModelConfig(half_life=2.0, cohort_level=False, time_trend=False)
    rng = np.random.default_rng(3)
    n = 6
    patient = np.zeros(n, dtype=int)
    exposure = rng.integers(0, 2, n).astype(float)
    time = np.sort(rng.uniform(0.0, 6.0, n))
    outcome = rng.normal(0.0, 1.0, n)
    stats = stats_from_events(1, patient, exposure, time, outcome, config)
    theta = Hyper(
        mu=jnp.asarray([0.2, -0.3]),
        tau=jnp.asarray([0.7, 0.4]),
        corr_chol=jnp.eye(2),
        tau_cohort=jnp.asarray(0.0),
        sigma=jnp.asarray(0.8),
        gamma=jnp.zeros(0),
    )
    collapsed = collapsed_loglik(theta, jnp.asarray(stats.gram), jnp.zeros(1, int), 1, config)
    weights = 0.5 ** ((time.max() - time) / config.half_life)
    design = np.stack([np.ones(n), exposure], -1)
    sigma_r = np.diag([0.7, 0.4]) ** 2
    cov = design @ sigma_r @ design.T + np.diag(0.8**2 / weights)
    dense = sps.multivariate_normal(design @ np.array([0.2, -0.3]), cov).logpdf(outcome)
    # power-likelihood normaliser: Σ ω log(2πσ²)/2 instead of Σ log(2πσ²/ω)/2
    correction = 0.5 * np.sum(np.log(2 * np.pi * 0.8**2 / weights)) - 0.5 * np.sum(
        weights * np.log(2 * np.pi * 0.8**2)
    )
    assert abs(float(collapsed) - (dense + correction)) < 1e-9


@pytest.mark.parametrize("half_life", [None, 0.7], ids=["no-forgetting", "forgetting"])
@pytest.mark.parametrize("config", CASES, ids=["full", "no-trend", "no-cohort"])
@pytest.mark.parametrize("seed", range(8))
def test_closed_form_gradient_equals_autodiff(config, seed, half_life):
    """collapsed_loglik's custom gradient (Fisher's identity) equals reverse-mode
    autodiff through the patient and cohort steps, with padding patients and cohorts."""
    from model.likelihood import _collapsed_value

    config = config.model_copy(update={"half_life": half_life})
    cohort, num_cohorts, patient, exposure, time, outcome, theta = random_problem(seed, config)
    stats = stats_from_events(cohort.size, patient, exposure, time, outcome, config)
    gram = jnp.asarray(np.concatenate([stats.gram, np.zeros((3, *stats.gram.shape[1:]))]))
    cohorts = jnp.asarray(np.concatenate([cohort, np.zeros(3, dtype=int)]))
    args = (gram, cohorts, num_cohorts + 2, config)
    value, grad = jax.value_and_grad(collapsed_loglik)(theta, *args)
    expected_value, expected = jax.value_and_grad(_collapsed_value)(theta, *args)
    assert abs(float(value - expected_value)) <= 1e-10 * max(1.0, abs(float(expected_value)))
    # The correlation factor is lower triangular: its upper entry carries no gradient.
    expected = expected._replace(corr_chol=jnp.tril(expected.corr_chol))
    for name, got, want in zip(Hyper._fields, grad, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-9, err_msg=name)
