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


def random_problem(seed: int, config: ModelConfig, num_covariates: int = 0):
    """A tiny programme and a random θ. With ``num_covariates``, θ.coef and the
    patients' covariates (returned as ``theta, covariates``) are random too, and
    time-varying covariates are the fixed-effect columns after the time trend."""
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
    if num_covariates:
        covariates = rng.normal(0.0, 1.0, (cohort.size, num_covariates))
        theta = theta._replace(coef=jnp.asarray(rng.normal(0.0, 0.7, (2, num_covariates))))
        return cohort, num_cohorts, patient, exposure, time, outcome, (theta, covariates)
    return cohort, num_cohorts, patient, exposure, time, outcome, theta


def dense_joint(
    cohort, patient, exposure, time, theta, config, covariates=None, fixed=None, levels=()
):
    """Mean and covariance of (y, b) where b stacks every patient's effect.
    covariates: (P, q) with theta.coef; fixed: (n, d_z) fixed-effect rows
    (default: the time column when the config has a trend); levels: further
    grouping levels as (group of each patient (P,), number of groups, sd) whose
    effects add to the cohort's (the latent vector holds them after the cohorts)."""
    theta = jax.tree.map(np.asarray, theta)
    n, num_patients = patient.size, cohort.size
    chol = theta.tau[:, None] * theta.corr_chol
    sigma_r = chol @ chol.T
    # Latent vector: (r_1, ..., r_P, u_1, ..., u_G), prior mean (μ, ..., μ, 0, ...).
    num_cohorts = int(cohort.max()) + 1
    num_groups = num_cohorts + sum(count for _, count, _ in levels)
    dim = 2 * num_patients + num_groups
    patient_means = np.tile(theta.mu, (num_patients, 1))
    if covariates is not None:
        patient_means = patient_means + covariates @ theta.coef.T  # μ_i = μ + B x_i
    prior_mean = np.concatenate([patient_means.ravel(), np.zeros(num_groups)])
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
    offset = 2 * num_patients + num_cohorts
    for group, count, sd in levels:  # r_i = μ + e_b (u_g + Σ_l u_l,g_l(i)) + η_i
        for g in range(count):
            prior_cov[offset + g, offset + g] = float(sd) ** 2
        for i in range(num_patients):
            to_effects[2 * i + 1, offset + group[i]] = 1.0
        offset += count
    latent_mean = to_effects @ prior_mean
    latent_cov = to_effects @ prior_cov @ to_effects.T
    design = np.zeros((n, dim))
    for row in range(n):
        i = patient[row]
        design[row, 2 * i] = 1.0
        design[row, 2 * i + 1] = exposure[row]
    if fixed is None:
        fixed = time[:, None] if config.time_trend else np.zeros((n, 0))
    y_mean = design @ latent_mean + fixed @ np.atleast_1d(theta.gamma)
    y_cov = design @ latent_cov @ design.T + float(theta.sigma) ** 2 * np.eye(n)
    cross = latent_cov @ design.T  # Cov(latent, y)
    return y_mean, y_cov, latent_mean, latent_cov, cross


def assert_same_hyper(got: Hyper, want: Hyper) -> None:
    """Every field equal to 1e-8 (relative); absent fields (None) absent in both."""
    for name, value, reference in zip(Hyper._fields, got, want, strict=True):
        if reference is None:
            assert value is None, name
            continue
        np.testing.assert_allclose(value, reference, rtol=1e-8, atol=1e-9, err_msg=name)


def dense_posterior(outcome, y_mean, y_cov, latent_mean, latent_cov, cross):
    """The latent posterior (mean, covariance) by Gaussian conditioning on y."""
    if not np.size(outcome):
        return latent_mean, latent_cov
    gain = np.linalg.solve(y_cov, cross.T).T
    return latent_mean + gain @ (outcome - y_mean), latent_cov - gain @ cross.T


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
    post_mean, post_cov = dense_posterior(outcome, y_mean, y_cov, latent_mean, latent_cov, cross)
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
    assert_same_hyper(grad, expected)


COVARIATE_CASES = [
    ModelConfig(time_covariates=("dose_change", "season")),
    ModelConfig(time_trend=False, time_covariates=("season",)),
    ModelConfig(cohort_level=False),
]
COVARIATE_IDS = ["trend+2-time-covariates", "1-time-covariate", "no-cohort"]


def covariate_problem(seed: int, config: ModelConfig):
    """random_problem with 1-3 patient covariates and the config's time-varying
    covariates as random per-reading columns; the Gram matrices built by
    model.evidence from those columns."""
    num_covariates = 1 + seed % 3
    cohort, num_cohorts, patient, exposure, time, outcome, (theta, covariates) = random_problem(
        seed, config, num_covariates
    )
    rng = np.random.default_rng(1000 + seed)
    time_covariates = rng.normal(0.0, 1.0, (patient.size, len(config.time_covariates)))
    stats = stats_from_events(
        cohort.size, patient, exposure, time, outcome, config, time_covariates=time_covariates
    )
    fixed = np.concatenate(
        [time[:, None]] * int(config.time_trend) + [time_covariates], axis=-1
    ).reshape(patient.size, config.fixed_dim)
    problem = (cohort, num_cohorts, patient, exposure, time, outcome)
    return problem, theta, covariates, stats, fixed


@pytest.mark.parametrize("config", COVARIATE_CASES, ids=COVARIATE_IDS)
@pytest.mark.parametrize("seed", range(10))
def test_covariates_loglik_and_posterior_equal_dense(config, seed):
    """Patient covariates in the mean (μ_i = μ + B x_i) and time-varying
    covariates as fixed effects: the collapsed likelihood equals the dense
    marginal, the patient-effect posterior the dense conditional."""
    problem, theta, covariates, stats, fixed = covariate_problem(seed, config)
    cohort, num_cohorts, patient, exposure, time, outcome = problem
    gram, x = jnp.asarray(stats.gram), jnp.asarray(covariates)
    collapsed = collapsed_loglik(theta, gram, jnp.asarray(cohort), num_cohorts, config, x)
    joint = dense_joint(cohort, patient, exposure, time, theta, config, covariates, fixed)
    y_mean, y_cov = joint[:2]
    if patient.size == 0:
        assert float(collapsed) == 0.0
    else:
        dense = sps.multivariate_normal(y_mean, y_cov).logpdf(outcome)
        assert abs(float(collapsed) - dense) <= 1e-8 * max(1.0, abs(dense))
    post_mean, post_cov = dense_posterior(outcome, *joint)
    u_mean, u_var = cohort_effect_posterior(
        theta, gram, jnp.asarray(cohort), num_cohorts, config, x
    )
    result = patient_effects_given_theta(theta, gram, u_mean[cohort], u_var[cohort], config, x)
    effect = 2 * np.arange(cohort.size) + 1
    np.testing.assert_allclose(result.mean, post_mean[effect], rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(result.variance, np.diag(post_cov)[effect], rtol=1e-8, atol=1e-9)
    expected = np.asarray(theta.mu)[1] + covariates @ np.asarray(theta.coef)[1]
    np.testing.assert_allclose(result.expected, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("config", COVARIATE_CASES, ids=COVARIATE_IDS)
@pytest.mark.parametrize("seed", range(6))
def test_covariates_closed_form_gradient_equals_autodiff(config, seed):
    """∂/∂B = S Σ_i E[δ_i] x_iᵀ and the time-varying covariates' ∂/∂γ by Fisher's
    identity equal reverse-mode autodiff, with padding patients (zero covariates)."""
    from model.likelihood import _collapsed_value

    problem, theta, covariates, stats, _ = covariate_problem(seed, config)
    cohort, num_cohorts = problem[0], problem[1]
    pad = 3
    gram = jnp.asarray(np.concatenate([stats.gram, np.zeros((pad, *stats.gram.shape[1:]))]))
    cohorts = jnp.asarray(np.concatenate([cohort, np.zeros(pad, dtype=int)]))
    x = jnp.asarray(np.concatenate([covariates, np.zeros((pad, covariates.shape[1]))]))
    args = (gram, cohorts, num_cohorts + 2, config, x)
    value, grad = jax.value_and_grad(collapsed_loglik)(theta, *args)
    expected_value, expected = jax.value_and_grad(_collapsed_value)(theta, *args)
    assert abs(float(value - expected_value)) <= 1e-10 * max(1.0, abs(float(expected_value)))
    expected = expected._replace(corr_chol=jnp.tril(expected.corr_chol))
    assert np.any(np.abs(np.asarray(grad.coef)) > 1e-6)  # the check has something to check
    assert_same_hyper(grad, expected)
