"""The joint model's collapsed likelihood and patient posteriors against dense
brute force, and its configuration checks.

Brute force: the joint Gaussian of every reading of every measure of every
patient written out (mean Wμ + Zγ, covariance W Σ_r Wᵀ + diag σ², Σ_r the prior
covariance of all patients' blocks: Σ on each patient's block and, with a
cohort level, E T² Eᵀ between any two blocks of the same cohort), its density
by scipy and the patient blocks' posterior by dense conditioning. Tiny random
problems, random θ, float64: agreement to rounding (1e-8).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps

from model.config import ModelConfig, PriorConfig
from model.events import Events
from model.joint import (
    JointConfig,
    JointHyper,
    block_posterior,
    cohort_posterior,
    cohort_posteriors,
    common_factor,
    effect_correlation_prior,
    initial_values,
    interleave_chol,
    joint_config_for,
    joint_from_sites,
    joint_grams,
    joint_loglik,
    joint_patients,
)

jax.config.update("jax_enable_x64", True)


def random_problem(
    seed: int, measures: int, time_trend: bool, cohorts: int = 0, count: int | None = None
):
    """A few patients with 0-4 readings of each measure (a patient may lack a
    measure, or have none at all) and a random θ (random full correlation).
    cohorts > 0: a cohort level, patients spread over that many cohorts (one
    of them left empty when there are enough; balanced) and a random τ_u per
    measure."""
    rng = np.random.default_rng(seed)
    count = int(rng.integers(2, 5)) if count is None else count
    cohort = np.zeros(count, dtype=int)
    if cohorts:
        used = max(cohorts - 1, 1)
        cohort = rng.permutation(np.arange(count) % used)
    events = []
    for _ in range(measures):
        patient = np.repeat(np.arange(count), rng.integers(0, 5, count))
        events.append(
            Events(
                patient,
                cohort,
                rng.uniform(0.0, 10.0, patient.size),
                rng.integers(0, 2, patient.size) * rng.choice([1.0, 2.5], patient.size),
                rng.normal(50.0, 8.0, patient.size),
            )
        )
    config = joint_config_for(events, time_trend=time_trend, cohort_level=bool(cohorts))
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
        tau_cohort=jnp.asarray(rng.uniform(0.2, 1.5, measures)),
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
    dense_reference.design = design  # for the cohort posterior's cross-covariance
    prior = np.kron(np.eye(count), sigma_r)
    if config.cohort_level:  # Cov(r_i, r_j) += E T² Eᵀ when i, j share a cohort
        cohort = events[0].cohort_of_patient
        shared = np.zeros((dim, dim))
        shared[1::2, 1::2] = np.diag(np.asarray(theta.tau_cohort) ** 2)
        prior = prior + np.kron((cohort[:, None] == cohort[None, :]).astype(float), shared)
    cov_y = design @ prior @ design.T + np.diag(noise)
    return np.asarray(y), np.asarray(mean), cov_y, prior @ design.T, prior


def check_against_dense(events, config, theta, count, cohort=None, num_cohorts=1):
    gram = jnp.asarray(joint_grams(events, config))
    y, mean, cov_y, cross, prior = dense_reference(events, config, theta, count)

    expected = sps.multivariate_normal(mean, cov_y).logpdf(y)
    got = float(joint_loglik(theta, gram, config, cohort, num_cohorts))
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)

    # r | y ~ N(μ + Cov(r, y) Cov(y)⁻¹ (y − E y), Σ − Cov(r, y) Cov(y)⁻¹ Cov(y, r))
    gain = np.linalg.solve(cov_y, cross.T).T
    dim = config.block_dim
    post_mean = np.tile(np.asarray(theta.mu).reshape(-1), count) + gain @ (y - mean)
    post_cov = prior - gain @ cross.T
    got_mean, got_cov = block_posterior(theta, gram, config, cohort, num_cohorts)
    np.testing.assert_allclose(got_mean, post_mean.reshape(count, dim), atol=1e-9)
    for i in range(count):
        block = slice(i * dim, (i + 1) * dim)
        np.testing.assert_allclose(got_cov[i], post_cov[block, block], atol=1e-9)
    if not config.cohort_level:
        return
    # u (G·M) | y: Cov(u_g, r_i) = T² Eᵀ for i in g, so Cov(u, y) = Cov(u, r) Wᵀ
    measures, prior_u = config.num_measures, np.asarray(theta.tau_cohort) ** 2
    u_r = np.zeros((num_cohorts * measures, count * dim))
    for i, g in enumerate(np.asarray(cohort)):
        for m in range(measures):
            u_r[g * measures + m, i * dim + 2 * m + 1] = prior_u[m]
    u_y = u_r @ dense_reference.design.T
    u_gain = np.linalg.solve(cov_y, u_y.T).T
    u_mean = u_gain @ (y - mean)
    u_cov = np.kron(np.eye(num_cohorts), np.diag(prior_u)) - u_gain @ u_y.T
    got_u_mean, got_u_cov = cohort_posterior(theta, gram, config, cohort, num_cohorts)
    np.testing.assert_allclose(got_u_mean, u_mean.reshape(num_cohorts, measures), atol=1e-9)
    for g in range(num_cohorts):
        block = slice(g * measures, (g + 1) * measures)
        np.testing.assert_allclose(got_u_cov[g], u_cov[block, block], atol=1e-9)


@pytest.mark.parametrize("measures", [2, 3])
@pytest.mark.parametrize("time_trend", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_collapsed_likelihood_and_posteriors_equal_dense(measures, time_trend, seed):
    check_against_dense(*random_problem(seed, measures, time_trend))


@pytest.mark.parametrize("measures", [2, 3])
@pytest.mark.parametrize("time_trend", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cohort_level_equals_dense(measures, time_trend, seed):
    """2 cohorts × 3 patients, plus an empty third cohort (padding): the
    cohort shifts correlate every pair of a cohort's patients' effects, which
    the dense covariance has and the per-cohort M×M step must reproduce."""
    events, config, theta, count = random_problem(seed, measures, time_trend, 3, 6)
    cohort = jnp.asarray(events[0].cohort_of_patient, dtype=jnp.int32)
    assert np.bincount(np.asarray(cohort), minlength=3).tolist() == [3, 3, 0]
    check_against_dense(events, config, theta, count, cohort, 3)


def test_cohort_level_at_zero_scale_is_the_model_without():
    events, config, theta, _ = random_problem(4, 3, True, 3, 6)
    gram = jnp.asarray(joint_grams(events, config))
    cohort = jnp.asarray(events[0].cohort_of_patient, dtype=jnp.int32)
    plain = config.model_copy(
        update={
            "measures": tuple(m.model_copy(update={"cohort_level": False}) for m in config.measures)
        }
    )
    still = theta._replace(tau_cohort=jnp.zeros(3))
    assert float(joint_loglik(still, gram, config, cohort, 4)) == pytest.approx(
        float(joint_loglik(theta, gram, plain)), abs=1e-10
    )
    assert float(joint_loglik(theta, gram, config, cohort, 4)) != pytest.approx(
        float(joint_loglik(theta, gram, plain)), abs=1e-3
    )


def test_padding_patients_contribute_nothing():
    events, config, theta, _ = random_problem(3, 3, True)
    gram = joint_grams(events, config)
    padded = np.concatenate([gram, np.zeros((5, *gram.shape[1:]))])
    assert float(joint_loglik(theta, jnp.asarray(padded), config)) == pytest.approx(
        float(joint_loglik(theta, jnp.asarray(gram), config)), abs=1e-10
    )


def test_unsupported_structure_is_refused():
    plain = ModelConfig(cohort_level=False, time_trend=False)
    assert JointConfig(measures=(plain.model_copy(update={"cohort_level": True}),) * 2).cohort_level
    with pytest.raises(ValueError, match="all have a cohort level or none"):
        JointConfig(measures=(plain, plain.model_copy(update={"cohort_level": True})))
    with pytest.raises(ValueError, match="2-6 measures"):
        JointConfig(measures=(plain,))
    with pytest.raises(ValueError, match="time trend"):
        JointConfig(measures=(plain, plain.model_copy(update={"time_trend": True})))


@pytest.mark.parametrize("measures", [2, 3, 6])
def test_interleaved_factor_is_the_cholesky_factor_of_interleaved_omega(measures):
    """blockdiag(L_a, L_b) interleaved into (a_1, b_1, …) order: lower
    triangular, positive diagonal, and L Lᵀ = Ω with Ω[2m, 2n] = Ω_a[m, n],
    Ω[2m+1, 2n+1] = Ω_b[m, n], Ω[2m, 2n+1] = 0 (built entry by entry here)."""
    import numpyro.distributions as dist

    keys = jax.random.split(jax.random.PRNGKey(measures), 2)
    intercepts = np.asarray(dist.LKJCholesky(measures, 1.0).sample(keys[0], (4,)))
    effects = np.asarray(dist.LKJCholesky(measures, 1.0).sample(keys[1], (4,)))
    chol = np.asarray(interleave_chol(jnp.asarray(intercepts), jnp.asarray(effects)))
    dim = 2 * measures
    assert chol.shape == (4, dim, dim)
    for s in range(4):
        omega_a = intercepts[s] @ intercepts[s].T
        omega_b = effects[s] @ effects[s].T
        omega = np.zeros((dim, dim))
        for m in range(measures):
            for n in range(measures):
                omega[2 * m, 2 * n] = omega_a[m, n]
                omega[2 * m + 1, 2 * n + 1] = omega_b[m, n]
        np.testing.assert_array_equal(np.triu(chol[s], 1), 0.0)
        assert np.all(np.diag(chol[s]) > 0)
        np.testing.assert_allclose(chol[s] @ chol[s].T, omega, atol=1e-12)
        np.testing.assert_allclose(np.linalg.cholesky(omega), chol[s], atol=1e-12)
        theta = JointHyper(
            jnp.zeros((measures, 2)),
            jnp.ones(dim),
            jnp.asarray(chol[s]),
            jnp.ones(measures),
            jnp.zeros((measures, 0)),
        )
        np.testing.assert_allclose(theta.effect_correlation, omega_b, atol=1e-12)


def test_sites_map_to_the_interleaved_factor():
    plain = ModelConfig(cohort_level=False, time_trend=False)
    config = JointConfig(measures=(plain, plain, plain))
    sites = {name: jnp.asarray(value) for name, value in initial_values(config).items()}
    sites["L_effects"] = jnp.linalg.cholesky(
        jnp.asarray([[1.0, 0.5, 0.2], [0.5, 1.0, -0.3], [0.2, -0.3, 1.0]])
    )
    theta = joint_from_sites(sites, config)
    assert theta.corr_chol.shape == (6, 6)
    np.testing.assert_allclose(theta.effect_correlation[0, 1], 0.5, atol=1e-12)
    np.testing.assert_allclose(theta.effect_correlation[1, 2], -0.3, atol=1e-12)
    omega = theta.corr_chol @ theta.corr_chol.T
    np.testing.assert_allclose(omega[0::2, 1::2], 0.0, atol=1e-12)
    np.testing.assert_allclose(omega[0::2, 0::2], np.eye(3), atol=1e-12)


def test_patients_scored_under_given_cohort_posteriors_equal_all_evidence():
    """Scoring a subset of patients under the cohorts' posteriors from all
    evidence (what a stream's posterior carries) equals scoring everyone."""
    events, config, theta, _ = random_problem(5, 3, False, 3, 6)
    gram = joint_grams(events, config)
    cohort = np.asarray(events[0].cohort_of_patient, dtype=np.int32)
    draws = jax.tree_util.tree_map(lambda leaf: jnp.stack([leaf, 1.2 * leaf]), theta)
    everyone = joint_patients(draws, gram, config, cohort=cohort, num_cohorts=3)
    moments = cohort_posteriors(draws, jnp.asarray(gram), jnp.asarray(cohort), 3, config)
    some = np.array([0, 4])
    alone = joint_patients(draws, gram[some], config, cohort=cohort[some], num_cohorts=3)
    given = joint_patients(
        draws, gram[some], config, cohort=cohort[some], num_cohorts=3, cohort_moments=moments
    )
    for name in ("effect_mean", "effect_sd", "responsiveness_mean", "p_above_population"):
        np.testing.assert_allclose(getattr(given, name), getattr(everyone, name)[some], atol=1e-9)
    assert not np.allclose(alone.effect_mean, everyone.effect_mean[some], atol=1e-6)


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


@pytest.mark.parametrize("weight", [0.0, 0.3])
def test_the_effect_correlation_prior_is_the_lkj_mixture_it_declares(weight):
    """effect_correlation_prior for two measures against the closed form: the
    LKJ(2, η) density of the one correlation r is Beta(η, η) on (−1, 1), and
    with a spike weight π the density is π Beta(η_s, η_s) + (1 − π) Beta(η, η)
    on (−1, 1); it integrates to 1."""
    priors = PriorConfig(
        effect_correlation_concentration=2.0,
        effect_correlation_spike_weight=weight,
        effect_correlation_spike_concentration=30.0,
    )
    prior = effect_correlation_prior(2, priors)
    r = np.linspace(-0.999, 0.999, 4001)
    chol = np.zeros((r.size, 2, 2))
    chol[:, 0, 0], chol[:, 1, 0], chol[:, 1, 1] = 1.0, r, np.sqrt(1.0 - r**2)
    density = np.exp(np.asarray(prior.log_prob(jnp.asarray(chol))))
    on_r = (r + 1.0) / 2.0  # Beta on (0, 1), scaled to (−1, 1)
    expected = (
        weight * sps.beta.pdf(on_r, 30.0, 30.0) + (1.0 - weight) * sps.beta.pdf(on_r, 2.0, 2.0)
    ) / 2.0
    np.testing.assert_allclose(density, expected, rtol=1e-6, atol=1e-12)
    assert abs(np.trapezoid(density, r) - 1.0) < 1e-3


def sphere(count: int) -> np.ndarray:
    """``count`` unit vectors spread evenly over the sphere in R³ (Fibonacci)."""
    k = np.arange(count) + 0.5
    z = 1.0 - 2.0 * k / count
    angle = np.pi * (1.0 + 5.0**0.5) * k
    radius = np.sqrt(1.0 - z**2)
    return np.column_stack([radius * np.cos(angle), radius * np.sin(angle), z])


def test_the_common_factor_is_the_benefits_direction_of_largest_variance():
    """common_factor against brute force: over 200,000 unit vectors w, the
    largest variance wᵀ S Ω S w of a combination of the signed benefits and the
    w reaching it (the grid's spacing, ~0.008 rad, bounds the error of w by
    about 0.01 and of the variance by ~1e-4 relative) for random correlations
    with mixed benefit signs."""
    rng = np.random.default_rng(3)
    grid = sphere(200_000)
    draws = []
    for _ in range(6):
        factor = rng.normal(size=(3, 3))
        cov = factor @ factor.T + 0.3 * np.eye(3)
        scale = np.sqrt(np.diag(cov))
        draws.append(cov / np.outer(scale, scale))
    correlation = np.stack(draws)
    signs = np.array([1.0, -1.0, -1.0])
    loadings, share = common_factor(correlation, signs)
    for omega, loading, explained in zip(correlation, loadings, share, strict=True):
        signed = omega * np.outer(signs, signs)
        variances = np.einsum("ka,ab,kb->k", grid, signed, grid)
        best = grid[np.argmax(variances)]
        best = best if best.sum() >= 0 else -best
        assert explained * 3 == pytest.approx(variances.max(), rel=2e-4)
        np.testing.assert_allclose(loading / np.linalg.norm(loading), best, atol=0.01)
        assert loading.sum() >= 0
        # a loading is the correlation of a measure's benefit with the factor
        component = signed @ best / np.sqrt(best @ signed @ best)
        np.testing.assert_allclose(loading, component, atol=0.01)


@pytest.mark.parametrize("count", [2, 3, 5])
def test_equicorrelated_benefits_have_the_closed_form_factor(count):
    """Benefits correlating r pairwise: λ₁ = 1 + (M − 1) r on the direction of
    equal weights, so every loading is √(λ₁ / M) and the share λ₁ / M; with
    independent benefits the share is 1/M. Flipping a measure's benefit sign
    together with its correlations' signs changes nothing."""
    signs = np.ones(count)
    signs[0] = -1.0
    for r in (0.0, 0.3, 0.7):
        omega = np.full((count, count), r) + (1.0 - r) * np.eye(count)
        flipped = omega * np.outer(signs, signs)  # the effects' correlation
        loadings, share = common_factor(flipped[None], signs)
        largest = 1.0 + (count - 1) * r
        assert share[0] == pytest.approx(largest / count, abs=1e-12)
        if r > 0:
            np.testing.assert_allclose(loadings[0], np.sqrt(largest / count), atol=1e-12)


def test_two_anti_correlated_benefits_load_the_first_measure_positively():
    omega = np.array([[[1.0, -0.6], [-0.6, 1.0]]])
    loadings, share = common_factor(omega, np.ones(2))
    np.testing.assert_allclose(loadings[0], np.sqrt(0.8) * np.array([1.0, -1.0]), atol=1e-12)
    assert share[0] == pytest.approx(0.8)
