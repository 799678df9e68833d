"""The likelihood of all evidence given the hyperparameters θ, with every
patient's local effects and every cohort's deviation integrated out exactly.

Model, standardised units (DESIGN.md), patient i in cohort g:

    y_it = w_itᵀ r_i + z_itᵀ γ + ε_it,   ε_it ~ N(0, σ² / ω_it)
    r_i = (a_i, b_i) ~ N(μ + e_b u_g, Σ),  Σ = diag(τ) Ω diag(τ)
    u_g ~ N(0, τ_u²)                        (cohort deviation of the effect b)

With forgetting, ω_it < 1 down-weights old observations (a power likelihood:
each term of the log-likelihood is multiplied by ω_it).

**Patient step.** From G_i and γ, σ (P = WᵀΩW/σ², h = WᵀΩ(y − Zγ)/σ²,
c = (y − Zγ)ᵀΩ(y − Zγ)/σ², n = Σω): integrating r_i ~ N(m, Σ) gives

    log L_i(m) = C_i + mᵀη_i − ½ mᵀ Ω_i m
    C_i = −½ n log(2πσ²) − ½ c − ½ log|I + LᵀPL| + ½ hᵀM⁻¹h
    η_i = S M⁻¹ h,   Ω_i = S M⁻¹ P,   S = Σ⁻¹,  M = P + S,  Σ = L Lᵀ

computed through K = I + LᵀPL (det K ≥ 1, so well conditioned for any τ):
M⁻¹ = L K⁻¹ Lᵀ and M⁻¹S = L K⁻¹ L⁻¹.

**Cohort step.** With m = μ + e_b u, log L_i is quadratic in u with curvature
j_i = (Ω_i)_bb and slope k_i = (η_i − Ω_i μ)_b. Summing over the cohort
(J_g = Σ j_i, K_g = Σ k_i) and integrating u_g ~ N(0, τ_u²):

    log L_g = Σ_i log L_i(μ) + ½ τ_u² K_g² / (1 + τ_u² J_g) − ½ log(1 + τ_u² J_g)

A patient with no evidence (zero Gram matrix) contributes exactly zero, and so
does an empty cohort: padding needs no mask.

The local design has two components (intercept, effect); 2×2 algebra is written
out in closed form so it vectorises over millions of patients without batched
LAPACK calls.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from model.config import ModelConfig

EFFECT = 1  # index of the exposure effect b in the local effects r = (a, b)


class Hyper(NamedTuple):
    """Hyperparameters θ (standardised units). May carry leading draw axes.

    mu: (..., 2) population mean of (intercept, effect)
    tau: (..., 2) between-patient sds of (intercept, effect)
    corr_chol: (..., 2, 2) Cholesky factor of their correlation
    tau_cohort: (...,) between-cohort sd of the effect (0 without a cohort level)
    sigma: (...,) residual sd
    gamma: (..., d_z) population fixed effects (time trend)
    """

    mu: jax.Array
    tau: jax.Array
    corr_chol: jax.Array
    tau_cohort: jax.Array
    sigma: jax.Array
    gamma: jax.Array

    @property
    def covariance_chol(self) -> jax.Array:
        """L with Σ = L Lᵀ: diag(τ) times the correlation's Cholesky factor."""
        return self.tau[..., :, None] * self.corr_chol


class PatientTerms(NamedTuple):
    """Per-patient results of integrating out the local effects given θ.

    const, eta, omega: C_i, η_i, Ω_i of the module docstring.
    m_inv_h: M⁻¹h, the data part of the conditional posterior mean of r_i.
    m_inv: M⁻¹, the conditional posterior covariance of r_i given (θ, u).
    m_inv_s: M⁻¹S, the weight on the prior mean (the shrinkage matrix).
    """

    const: jax.Array
    eta: jax.Array
    omega: jax.Array
    m_inv_h: jax.Array
    m_inv: jax.Array
    m_inv_s: jax.Array


def _mat2(a00: jax.Array, a01: jax.Array, a10: jax.Array, a11: jax.Array) -> jax.Array:
    return jnp.stack([jnp.stack([a00, a01], -1), jnp.stack([a10, a11], -1)], -2)


def _matmul2(a: jax.Array, b: jax.Array) -> jax.Array:
    """(..., 2, 2) @ (..., 2, 2), written out so XLA fuses it elementwise."""
    return _mat2(
        a[..., 0, 0] * b[..., 0, 0] + a[..., 0, 1] * b[..., 1, 0],
        a[..., 0, 0] * b[..., 0, 1] + a[..., 0, 1] * b[..., 1, 1],
        a[..., 1, 0] * b[..., 0, 0] + a[..., 1, 1] * b[..., 1, 0],
        a[..., 1, 0] * b[..., 0, 1] + a[..., 1, 1] * b[..., 1, 1],
    )


def _matvec2(a: jax.Array, v: jax.Array) -> jax.Array:
    return jnp.stack(
        [
            a[..., 0, 0] * v[..., 0] + a[..., 0, 1] * v[..., 1],
            a[..., 1, 0] * v[..., 0] + a[..., 1, 1] * v[..., 1],
        ],
        -1,
    )


def _transpose2(a: jax.Array) -> jax.Array:
    return jnp.swapaxes(a, -1, -2)


def _inverse_and_logdet2(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inverse and log-determinant of (..., 2, 2) symmetric positive-definite matrices."""
    det = a[..., 0, 0] * a[..., 1, 1] - a[..., 0, 1] * a[..., 1, 0]
    inverse = _mat2(a[..., 1, 1], -a[..., 0, 1], -a[..., 1, 0], a[..., 0, 0]) / det[..., None, None]
    return inverse, jnp.log(det)


def _lower_inverse2(chol: jax.Array) -> jax.Array:
    """Inverse of a lower-triangular (..., 2, 2) matrix."""
    l00, l10, l11 = chol[..., 0, 0], chol[..., 1, 0], chol[..., 1, 1]
    zero = jnp.zeros_like(l00)
    return _mat2(1.0 / l00, zero, -l10 / (l00 * l11), 1.0 / l11)


def patient_terms(theta: Hyper, gram: jax.Array, config: ModelConfig) -> PatientTerms:
    """Integrate out each patient's local effects given θ (no draw axes on θ).

    gram: (P, d, d) standardised Gram matrices (model.evidence).
    """
    d_w, d_z = config.local_dim, config.fixed_dim
    ww = gram[:, :d_w, :d_w]
    wy = gram[:, :d_w, -1]
    yy = gram[:, -1, -1]
    n = gram[:, 0, 0]
    if d_z:
        wz = gram[:, :d_w, d_w : d_w + d_z]
        zz = gram[:, d_w : d_w + d_z, d_w : d_w + d_z]
        zy = gram[:, d_w : d_w + d_z, -1]
        wy = wy - wz @ theta.gamma
        yy = yy - 2.0 * zy @ theta.gamma + theta.gamma @ zz @ theta.gamma
    variance = theta.sigma**2
    precision = ww / variance  # P
    h = wy / variance
    c = yy / variance

    chol = theta.covariance_chol  # L, shared by all patients
    k = jnp.eye(d_w) + _matmul2(_matmul2(_transpose2(chol), precision), chol)
    k_inv, logdet_k = _inverse_and_logdet2(k)
    m_inv = _matmul2(_matmul2(chol, k_inv), _transpose2(chol))
    m_inv_s = _matmul2(_matmul2(chol, k_inv), _lower_inverse2(chol))
    m_inv_h = _matvec2(m_inv, h)
    s_m_inv = _transpose2(m_inv_s)
    eta = _matvec2(s_m_inv, h)
    omega = _matmul2(s_m_inv, precision)
    omega = 0.5 * (omega + _transpose2(omega))
    const = (
        -0.5 * n * jnp.log(2.0 * jnp.pi * variance)
        - 0.5 * c
        - 0.5 * logdet_k
        + 0.5 * jnp.sum(h * m_inv_h, axis=-1)
    )
    return PatientTerms(const, eta, omega, m_inv_h, m_inv, m_inv_s)


def cohort_sums(
    theta: Hyper, terms: PatientTerms, cohort: jax.Array, num_cohorts: int
) -> tuple[jax.Array, jax.Array]:
    """J_g = Σ_i (Ω_i)_bb and K_g = Σ_i (η_i − Ω_i μ)_b over each cohort's patients."""
    curvature = terms.omega[:, EFFECT, EFFECT]
    slope = terms.eta[:, EFFECT] - _matvec2(terms.omega, theta.mu)[:, EFFECT]
    total_curvature = jax.ops.segment_sum(curvature, cohort, num_segments=num_cohorts)
    total_slope = jax.ops.segment_sum(slope, cohort, num_segments=num_cohorts)
    return total_curvature, total_slope


def cohort_posterior(
    tau_cohort: jax.Array, curvature: jax.Array, slope: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Posterior (mean, variance) of u_g ~ N(0, τ_u²) given a likelihood
    exp(k u − ½ j u²): variance τ_u²/(1 + τ_u² j), mean variance · k."""
    variance = tau_cohort**2 / (1.0 + tau_cohort**2 * curvature)
    return variance * slope, variance


def collapsed_loglik(
    theta: Hyper, gram: jax.Array, cohort: jax.Array, num_cohorts: int, config: ModelConfig
) -> jax.Array:
    """log p(all evidence | θ) with patients' and cohorts' effects integrated out.

    gram: (P, d, d); cohort: (P,) int in [0, num_cohorts). Cost O(P).
    """
    terms = patient_terms(theta, gram, config)
    at_mean = (
        terms.const
        + jnp.sum(terms.eta * theta.mu, axis=-1)
        - 0.5 * jnp.sum(theta.mu * _matvec2(terms.omega, theta.mu), axis=-1)
    )
    total = jnp.sum(at_mean)
    if not config.cohort_level:
        return total
    curvature, slope = cohort_sums(theta, terms, cohort, num_cohorts)
    prior_var = theta.tau_cohort**2
    one_plus = 1.0 + prior_var * curvature
    return total + jnp.sum(0.5 * prior_var * slope**2 / one_plus - 0.5 * jnp.log(one_plus))


class EffectComponents(NamedTuple):
    """Posterior of each patient's effect b_i given one θ (standardised units):
    Gaussian with ``mean`` and ``variance``; ``cohort_mean`` is the posterior mean
    of the cohort deviation u_g(i); ``shrinkage`` is (M⁻¹S)_bb, the weight the
    conditional mean puts on the prior (1: all pooled, 0: all the patient's own data).
    """

    mean: jax.Array
    variance: jax.Array
    cohort_mean: jax.Array
    shrinkage: jax.Array


def patient_effects_given_theta(
    theta: Hyper, gram: jax.Array, cohort: jax.Array, num_cohorts: int, config: ModelConfig
) -> EffectComponents:
    """Exact Gaussian posterior of every patient's effect given θ.

    r_i | θ, u, data ~ N(M⁻¹h + M⁻¹S(μ + e_b u), M⁻¹) and u_g | θ, data ~ N(m_g, v_g),
    so marginally over u_g: mean M⁻¹h + M⁻¹Sμ + (M⁻¹S)e_b m_g and covariance
    M⁻¹ + v_g (M⁻¹S e_b)(M⁻¹S e_b)ᵀ.
    """
    terms = patient_terms(theta, gram, config)
    mean = terms.m_inv_h + _matvec2(terms.m_inv_s, theta.mu)
    variance = terms.m_inv[:, EFFECT, EFFECT]
    if config.cohort_level:
        curvature, slope = cohort_sums(theta, terms, cohort, num_cohorts)
        u_mean, u_var = cohort_posterior(theta.tau_cohort, curvature, slope)
        loading = terms.m_inv_s[:, EFFECT, EFFECT]
        cohort_mean = u_mean[cohort]
        effect_mean = mean[:, EFFECT] + loading * cohort_mean
        variance = variance + u_var[cohort] * loading**2
    else:
        cohort_mean = jnp.zeros_like(variance)
        effect_mean = mean[:, EFFECT]
    return EffectComponents(
        mean=effect_mean,
        variance=variance,
        cohort_mean=cohort_mean,
        shrinkage=terms.m_inv_s[:, EFFECT, EFFECT],
    )
