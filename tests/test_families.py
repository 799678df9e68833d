"""Bernoulli and Poisson measures (model.families): the Laplace step against an
independent direct Laplace approximation and against dense brute-force
integration, on tiny random problems (float64).

Brute force: every patient's 2-D integral ∫ exp(ℓ_i(r)) N(r; m, Σ) dr on a dense
grid (201², ±10 posterior sds), the cohort deviation integrated by 40-node
Gauss-Hermite quadrature of the cohort's product over its patients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import expit

from model.config import ModelConfig
from model.families import FamilyError, cell_stats, laplace_loglik, local_posterior
from model.likelihood import Hyper

jax.config.update("jax_enable_x64", True)


def _log_partition(eta: np.ndarray, family: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if family == "bernoulli":
        p = expit(eta)
        return np.logaddexp(0.0, eta), p, p * (1.0 - p)
    rate = np.exp(eta)
    return rate, rate, rate


def random_problem(seed: int, family: str, num_patients: int = 4, readings=(10, 40)):
    """A tiny programme (2 cohorts) of one family and a random θ."""
    rng = np.random.default_rng(seed)
    cohort = rng.integers(0, 2, num_patients)
    counts = rng.integers(*readings, num_patients)
    patient = np.repeat(np.arange(num_patients), counts)
    exposure = rng.integers(0, 2, patient.size).astype(float)
    eta = rng.normal(-0.5, 0.8, num_patients)[patient]
    eta = eta + rng.normal(0.5, 0.7, num_patients)[patient] * exposure
    offset = None
    if family == "bernoulli":
        outcome = (rng.uniform(size=patient.size) < expit(eta)).astype(float)
    else:
        offset = rng.uniform(0.5, 2.0, patient.size)
        outcome = rng.poisson(np.exp(eta) * offset).astype(float)
    cells = cell_stats(num_patients, patient, exposure, outcome, family, offset)
    rho = rng.uniform(-0.5, 0.5)
    theta = Hyper(
        mu=jnp.asarray(rng.normal(0.0, 0.5, 2)),
        tau=jnp.asarray(rng.uniform(0.3, 1.2, 2)),
        corr_chol=jnp.asarray([[1.0, 0.0], [rho, np.sqrt(1.0 - rho**2)]]),
        tau_cohort=jnp.asarray(rng.uniform(0.2, 0.8)),
        sigma=jnp.asarray(1.0),
        gamma=jnp.zeros(0),
    )
    return cells, cohort, theta


def _prior(theta: Hyper) -> tuple[np.ndarray, np.ndarray]:
    chol = np.asarray(theta.tau)[:, None] * np.asarray(theta.corr_chol)
    return np.asarray(theta.mu), chol @ chol.T


def _cell_loglik(cells: np.ndarray, a: np.ndarray, b: np.ndarray, family: str) -> np.ndarray:
    n0, s0, n1, s1, k = cells
    return (
        s0 * a
        - n0 * _log_partition(a, family)[0]
        + s1 * (a + b)
        - n1 * _log_partition(a + b, family)[0]
        + k
    )


def brute_force(cells, cohort, theta, family, cohort_level, grid=201, nodes=40):
    """log p(y | θ) by dense quadrature, and (without a cohort level) every
    patient's posterior mean and sd of b. Each patient's grid is placed by a
    coarse pass over ±8 prior sds, then spans ±10 of the coarse posterior sds."""
    mu, cov = _prior(theta)
    precision = np.linalg.inv(cov)
    normaliser = -0.5 * np.log(np.linalg.det(2 * np.pi * cov))

    def log_density(c, m, grid_a, grid_b):
        d0, d1 = grid_a - m[0], grid_b - m[1]
        quad = precision[0, 0] * d0 * d0 + 2 * precision[0, 1] * d0 * d1 + precision[1, 1] * d1 * d1
        return _cell_loglik(c, grid_a, grid_b, family) - 0.5 * quad + normaliser

    def moments(f, grid_a, grid_b):
        weight = np.exp(f - f.max())
        weight /= weight.sum()
        mean = [np.sum(weight * grid_a), np.sum(weight * grid_b)]
        sd = [
            np.sqrt(np.sum(weight * (g - m) ** 2))
            for g, m in zip((grid_a, grid_b), mean, strict=True)
        ]
        return np.array(mean), np.array(sd)

    def integrate(c, m):
        """(log ∫, posterior mean of b, posterior sd of b) for one patient."""
        sd = np.sqrt(np.diag(cov))
        centre, spread = m, 8 * sd + 3
        for _ in range(2):  # coarse, then fine
            a = np.linspace(centre[0] - spread[0], centre[0] + spread[0], grid)
            b = np.linspace(centre[1] - spread[1], centre[1] + spread[1], grid)
            grid_a, grid_b = np.meshgrid(a, b, indexing="ij")
            f = log_density(c, m, grid_a, grid_b)
            centre, post_sd = moments(f, grid_a, grid_b)
            spread = 10 * post_sd
        top = f.max()
        log_int = top + np.log(np.exp(f - top).sum() * (a[1] - a[0]) * (b[1] - b[0]))
        return log_int, centre[1], post_sd[1]

    if not cohort_level:
        results = np.array([integrate(c, mu) for c in cells])
        return results[:, 0].sum(), results[:, 1], results[:, 2]
    x, w = np.polynomial.hermite_e.hermegauss(nodes)
    w = w / w.sum()
    total = 0.0
    for g in np.unique(cohort):
        values = np.array(
            [
                sum(integrate(c, mu + np.array([0.0, u]))[0] for c in cells[cohort == g])
                for u in float(theta.tau_cohort) * x
            ]
        )
        top = values.max()
        total += top + np.log(np.sum(w * np.exp(values - top)))
    return total, None, None


def direct_laplace(cells, cohort, theta, family, num_cohorts):
    """The Laplace approximation of log p(y | θ) over all latent effects jointly,
    written out densely: Newton to the joint mode of (r_1, …, r_P, u_1, …, u_G),
    then f(x̂) + ½ d log 2π − ½ log|−∇²f(x̂)|."""
    mu, cov = _prior(theta)
    precision = np.linalg.inv(cov)
    tau_u = float(theta.tau_cohort)
    num_patients = cells.shape[0]
    dim = 2 * num_patients + num_cohorts
    # r_i − μ − e_b u_g = D x − μ, D the map from x to the patients' deviations
    design = np.zeros((2 * num_patients, dim))
    design[:, : 2 * num_patients] = np.eye(2 * num_patients)
    for i in range(num_patients):
        design[2 * i + 1, 2 * num_patients + cohort[i]] = -1.0
    prior_prec = design.T @ np.kron(np.eye(num_patients), precision) @ design
    prior_prec[2 * num_patients :, 2 * num_patients :] += np.eye(num_cohorts) / tau_u**2
    prior_shift = design.T @ np.kron(np.eye(num_patients), precision) @ np.tile(mu, num_patients)
    logdet_prior = num_patients * np.log(np.linalg.det(2 * np.pi * cov)) + num_cohorts * np.log(
        2 * np.pi * tau_u**2
    )
    mean_quad = (
        np.tile(mu, num_patients)
        @ np.kron(np.eye(num_patients), precision)
        @ np.tile(mu, num_patients)
    )

    def value_grad_hess(x):
        a, b = x[0 : 2 * num_patients : 2], x[1 : 2 * num_patients : 2]
        value = sum(_cell_loglik(cells[i], a[i], b[i], family) for i in range(num_patients))
        value += -0.5 * (x @ prior_prec @ x - 2 * prior_shift @ x + mean_quad) - 0.5 * logdet_prior
        grad = -(prior_prec @ x - prior_shift)
        hess = -prior_prec.copy()
        for i in range(num_patients):
            n0, s0, n1, s1, _ = cells[i]
            _, d0, dd0 = _log_partition(a[i], family)
            _, d1, dd1 = _log_partition(a[i] + b[i], family)
            g0, g1 = s0 - n0 * d0, s1 - n1 * d1
            w0, w1 = n0 * dd0, n1 * dd1
            grad[2 * i] += g0 + g1
            grad[2 * i + 1] += g1
            hess[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] -= np.array([[w0 + w1, w1], [w1, w1]])
        return value, grad, hess

    x = np.zeros(dim)
    x[: 2 * num_patients] = np.tile(mu, num_patients)
    for _ in range(100):
        _, grad, hess = value_grad_hess(x)
        x = x - np.linalg.solve(hess, grad)
    value, grad, hess = value_grad_hess(x)
    assert np.max(np.abs(grad)) < 1e-10
    return value + 0.5 * dim * np.log(2 * np.pi) - 0.5 * np.linalg.slogdet(-hess)[1]


FAMILIES = ["bernoulli", "poisson"]
laplace = jax.jit(laplace_loglik, static_argnums=(3, 4))
posterior = jax.jit(local_posterior, static_argnums=(3, 4))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("seed", range(4))
def test_laplace_step_is_the_joint_laplace_approximation(family, seed):
    """The vectorised Laplace step (alternating patient modes and cohort means,
    then the Gaussian collapse of the expansion) equals the joint Laplace
    approximation computed densely, to 1e-6: the fixed point is the joint mode
    and the pseudo-Gram bookkeeping (constant, information, correction) is exact."""
    cells, cohort, theta = random_problem(seed, family)
    config = ModelConfig(time_trend=False, family=family)
    fast = float(laplace(theta, jnp.asarray(cells), jnp.asarray(cohort), 2, config))
    reference = direct_laplace(cells, cohort, theta, family, 2)
    assert abs(fast - reference) < 1e-6


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cohort_level", [False, True], ids=["no-cohort", "cohort"])
@pytest.mark.parametrize("seed", range(3))
def test_laplace_loglik_against_dense_brute_force(family, cohort_level, seed):
    """Laplace's error in log p(y | θ) is O(1/n) per patient (n readings): with
    10-40 readings per patient it measured 0.011-0.026 per patient for Bernoulli
    and 0.003-0.007 for Poisson (4 patients); the bounds are twice the largest.
    The quadrature's own error is < 1e-6 (halving the grid step changes nothing
    at that level). With 16× the readings the error must shrink at least 2×
    (measured 4.9× and 2.6×: a cell with few events stays skewed however many
    readings it has, so the O(1/n) rate holds only as counts grow too)."""
    config = ModelConfig(time_trend=False, cohort_level=cohort_level, family=family)
    bound = {"bernoulli": 0.05, "poisson": 0.015}[family]
    cells, cohort, theta = random_problem(seed, family)
    approx = float(laplace(theta, jnp.asarray(cells), jnp.asarray(cohort), 2, config))
    exact = brute_force(cells, cohort, theta, family, cohort_level)[0]
    error = abs(approx - exact)
    assert error < bound * cells.shape[0]
    more = cells * 16.0  # the same cell proportions, 16x the readings
    more[:, 4] = 0.0  # the constant is not part of the approximation
    cells[:, 4] = 0.0
    approx = float(laplace(theta, jnp.asarray(more), jnp.asarray(cohort), 2, config))
    exact = brute_force(more, cohort, theta, family, cohort_level)[0]
    assert abs(approx - exact) < error / 2.0


@pytest.mark.parametrize("family", FAMILIES)
def test_patient_posterior_against_dense_brute_force(family):
    """Given θ (no cohort level), the Laplace posterior of each patient's effect
    b against the dense grid's exact posterior: the Gaussian at the mode is
    within 0.15 posterior sd in mean and 10% in sd with 10-40 readings per
    patient (skewness of a binomial posterior at these sizes moves the mean from
    the mode by ~0.1 sd)."""
    cells, cohort, theta = random_problem(7, family, num_patients=6)
    config = ModelConfig(time_trend=False, cohort_level=False, family=family)
    post = posterior(theta, jnp.asarray(cells), jnp.asarray(cohort), 2, config)
    _, mean, sd = brute_force(cells, cohort, theta, family, cohort_level=False)
    np.testing.assert_array_less(np.abs(np.asarray(post.mean1) - mean) / sd, 0.15)
    np.testing.assert_allclose(np.sqrt(np.asarray(post.var1)), sd, rtol=0.10)


def test_patients_without_readings_contribute_nothing():
    cells, cohort, theta = random_problem(1, "poisson")
    config = ModelConfig(time_trend=False, family="poisson")
    padded = np.concatenate([cells, np.zeros((3, 5))])
    value = laplace(theta, jnp.asarray(cells), jnp.asarray(cohort), 2, config)
    with_padding = laplace(
        theta, jnp.asarray(padded), jnp.asarray(np.r_[cohort, 0, 1, 0]), 2, config
    )
    assert abs(float(value) - float(with_padding)) < 1e-10


def test_cell_stats_reject_invalid_values():
    patient = np.array([0, 0, 1])
    exposure = np.array([0.0, 1.0, 1.0])
    with pytest.raises(FamilyError, match="0 or 1"):
        cell_stats(2, patient, exposure, np.array([0.0, 2.0, 1.0]), "bernoulli")
    with pytest.raises(FamilyError, match="non-negative integer"):
        cell_stats(2, patient, exposure, np.array([0.0, -1.0, 1.0]), "poisson")
    with pytest.raises(FamilyError, match="non-negative integer"):
        cell_stats(2, patient, exposure, np.array([0.0, 1.5, 1.0]), "poisson")
    with pytest.raises(FamilyError, match="exposure of 0 or 1"):
        cell_stats(2, patient, np.array([0.0, 0.5, 1.0]), np.array([0.0, 1.0, 1.0]), "bernoulli")


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_is_the_derivative_of_the_laplace_value(family):
    """Reverse mode (the search stopped, one differentiable joint Newton step)
    against central finite differences of the value itself, in every
    hyperparameter the fit moves: the mode's own dependence on θ is included
    (holding the expansion point fixed instead errs by 0.04-0.26 in these
    derivatives: the third-derivative terms). Step 1e-5: truncation ~1e-10, rounding ~1e-9 of values ~100."""
    cells, cohort, theta = random_problem(2, family)
    config = ModelConfig(time_trend=False, family=family)
    args = (jnp.asarray(cells), jnp.asarray(cohort), 2, config)
    grad = jax.jit(jax.grad(laplace_loglik), static_argnums=(3, 4))(theta, *args)
    step = 1e-5
    for name in ("mu", "tau", "tau_cohort"):
        value = np.asarray(getattr(theta, name), dtype=float)
        for index in np.ndindex(value.shape):
            bump = np.zeros_like(value)
            bump[index] = step
            up = laplace(theta._replace(**{name: jnp.asarray(value + bump)}), *args)
            down = laplace(theta._replace(**{name: jnp.asarray(value - bump)}), *args)
            numeric = (float(up) - float(down)) / (2 * step)
            assert abs(float(np.asarray(getattr(grad, name))[index]) - numeric) < 1e-5, name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("half_life", [None, 3.0], ids=["no-forgetting", "forgetting"])
def test_cell_statistics_one_reading_at_a_time_equal_the_batch(family, half_life):
    """The stream's step (add_cell_reading), readings in shuffled time order,
    against cell_stats of all readings with their weights at the latest time;
    and merging two halves (model.evidence.merge_stats) gives the same."""
    from model.evidence import gram_stats, merge_stats
    from model.families import add_cell_reading

    rng = np.random.default_rng(5)
    n = 40
    time = rng.uniform(0.0, 10.0, n)
    exposure = rng.integers(0, 2, n).astype(float)
    offset = rng.uniform(0.5, 2.0, n) if family == "poisson" else np.ones(n)
    outcome = (
        rng.integers(0, 2, n) if family == "bernoulli" else rng.poisson(2.0 * offset)
    ).astype(float)
    cells, reference = bytes(8 * 5), -np.inf
    for t in rng.permutation(n):
        cells, reference = add_cell_reading(
            cells, reference, exposure[t], time[t], outcome[t], family, half_life, offset[t]
        )
    weights = np.ones(n) if half_life is None else 0.5 ** ((time.max() - time) / half_life)
    batch = cell_stats(
        1, np.zeros(n, int), exposure, outcome, family,
        offset if family == "poisson" else None, weights,
    )  # fmt: skip
    np.testing.assert_allclose(np.frombuffer(cells), batch[0], rtol=1e-12, atol=1e-12)
    config = ModelConfig(time_trend=False, family=family, half_life=half_life)
    halves = []
    for rows in (time < 5.0, time >= 5.0):
        part = cell_stats(
            1, np.zeros(rows.sum(), int), exposure[rows], outcome[rows], family,
            offset[rows] if family == "poisson" else None,
            np.ones(rows.sum()) if half_life is None
            else 0.5 ** ((time[rows].max() - time[rows]) / half_life),
        )  # fmt: skip
        halves.append(gram_stats(part, np.array([time[rows].max()])))
    merged = merge_stats(*halves, config)
    np.testing.assert_allclose(merged.gram[0], batch[0], rtol=1e-12, atol=1e-12)
