"""The likelihood of all evidence given the hyperparameters θ, with every
patient's local effects and every cohort's deviation integrated out exactly.

Model, standardised units (DESIGN.md), patient i in cohort g:

    y_it = w_itᵀ r_i + z_itᵀ γ + ε_it,   ε_it ~ N(0, σ² / ω_it)
    r_i = (a_i, b_i) ~ N(μ_i + e_b u_g, Σ),  Σ = diag(τ) Ω diag(τ)
    μ_i = μ + B x_i                         (x_i: patient covariates, standardised)
    u_g ~ N(0, τ_u²)                        (cohort deviation of the effect b)

z_it holds the population fixed effects: the time trend and any time-varying
covariates. The effect row of B holds the effect modifiers: how the expected
benefit changes with a patient's baseline characteristics.

With forgetting, ω_it < 1 down-weights old observations (a power likelihood:
each term of the log-likelihood is multiplied by ω_it).

Every formula below takes μ per patient (μ_i); without covariates μ_i = μ.

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

**Several grouping levels.** With further levels (ModelConfig.grouping_levels,
crossed with or nested in the cohorts) the effect's mean is shifted by
s_i = Σ_l u_{l, g_l(i)}, u_{l, g} ~ N(0, τ_l²) (τ_0 = τ_u, the cohort level).
Stacking every level's groups in u (G groups in all) and writing a_i for the
0/1 vector of patient i's groups, Σ_i k_i s_i − ½ j_i s_i² = kᵀu − ½ uᵀJu with
k = Σ_i k_i a_i and J = Σ_i j_i a_i a_iᵀ (diagonal blocks per level, the
cross-tabulation of j between levels off them). With D = diag(τ_l² of each
group), D^½ = S_u and B = I + S_u J S_u (Cholesky; det B ≥ 1, fine as τ → 0):

    log ∫ = ½ (S_u k)ᵀ B⁻¹ (S_u k) − ½ log|B|
    u | y ~ N(S_u B⁻¹ S_u k, S_u B⁻¹ S_u)
    E[s_i] = a_iᵀ E[u],   Var[s_i] = a_iᵀ Cov[u] a_i

Dense in G (tens to hundreds of groups); used only when there are further
levels, the single cohort level keeps the elementwise step above.

The local design has two components (intercept, effect); 2×2 algebra is written
out in closed form so it vectorises over millions of patients without batched
LAPACK calls.

**Gradient.** Reverse-mode derivatives in θ come from Fisher's identity in
closed form (collapsed_loglik_and_grad): posterior moments of r_i and u_g, one
elementwise pass and one sum over patients, several times cheaper on CPU than
autodiff through the patient step (benchmarks/README.md).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig

EFFECT = 1  # index of the exposure effect b in the local effects r = (a, b)


class Hyper(NamedTuple):
    """Hyperparameters θ (standardised units). May carry leading draw axes.

    mu: (..., 2) population mean of (intercept, effect)
    tau: (..., 2) between-patient sds of (intercept, effect)
    corr_chol: (..., 2, 2) Cholesky factor of their correlation
    tau_cohort: (...,) between-cohort sd of the effect (0 without a cohort level)
    sigma: (...,) residual sd
    gamma: (..., d_z) population fixed effects (time trend, time-varying covariates)
    coef: (..., 2, q) B, the coefficients of the patient covariates in the mean
        of (intercept, effect); row EFFECT holds the effect modifiers. None: the
        model has no patient covariates.
    tau_groups: (..., L) between-group sd of the effect at each further grouping
        level (ModelConfig.grouping_levels, crossed with the cohorts). None: the
        model has only the cohort level.
    """

    mu: jax.Array
    tau: jax.Array
    corr_chol: jax.Array
    tau_cohort: jax.Array
    sigma: jax.Array
    gamma: jax.Array
    coef: jax.Array | None = None
    tau_groups: jax.Array | None = None

    @property
    def covariance_chol(self) -> jax.Array:
        """L with Σ = L Lᵀ: diag(τ) times the correlation's Cholesky factor."""
        return self.tau[..., :, None] * self.corr_chol


class Mat2(NamedTuple):
    """A 2×2 matrix [[a, b], [c, d]] held as four arrays of any common shape.

    Keeping components as separate arrays (instead of stacking (P, 2, 2)) makes
    forward *and* reverse-mode passes purely elementwise, which XLA fuses into a
    few loops over patients; stacked arrays cost ~20× more in the gradient.
    """

    a: jax.Array
    b: jax.Array
    c: jax.Array
    d: jax.Array

    def __matmul__(self, other: Mat2) -> Mat2:
        return Mat2(
            self.a * other.a + self.b * other.c,
            self.a * other.b + self.b * other.d,
            self.c * other.a + self.d * other.c,
            self.c * other.b + self.d * other.d,
        )

    def apply(self, v0: jax.Array, v1: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Matrix-vector product with the vector (v0, v1)."""
        return self.a * v0 + self.b * v1, self.c * v0 + self.d * v1

    @property
    def T(self) -> Mat2:
        return Mat2(self.a, self.c, self.b, self.d)

    def inverse_and_logdet(self) -> tuple[Mat2, jax.Array]:
        """For positive-definite matrices (the log needs det > 0)."""
        det = self.a * self.d - self.b * self.c
        return Mat2(self.d / det, -self.b / det, -self.c / det, self.a / det), jnp.log(det)

    @classmethod
    def from_array(cls, array: jax.Array) -> Mat2:
        return cls(array[..., 0, 0], array[..., 0, 1], array[..., 1, 0], array[..., 1, 1])


def _lower_inverse(chol: Mat2) -> Mat2:
    """Inverse of a lower-triangular 2×2 matrix."""
    return Mat2(1.0 / chol.a, jnp.zeros_like(chol.a), -chol.c / (chol.a * chol.d), 1.0 / chol.d)


def prior_means(theta: Hyper, covariates: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """μ_i = μ + B x_i as its two components: scalars without covariates, else
    (P,) arrays. covariates: (P, q) standardised, or None.

    Written out per covariate (q is small) so the patient step stays elementwise.
    """
    mu0, mu1 = theta.mu[0], theta.mu[1]
    if theta.coef is None or covariates is None:
        return mu0, mu1
    for k in range(covariates.shape[-1]):
        mu0 = mu0 + theta.coef[0, k] * covariates[:, k]
        mu1 = mu1 + theta.coef[1, k] * covariates[:, k]
    return mu0, mu1


class PatientTerms(NamedTuple):
    """Per-patient results of integrating out the local effects given θ, (P,) arrays.

    at_mean: log L_i(μ), the patient's marginal log-likelihood with its prior
        centred at the population mean (no cohort shift).
    curvature, slope: j_i and k_i of the cohort step (quadratic in u).
    cond_mean: conditional posterior mean of r_i given θ and u = 0, M⁻¹h + M⁻¹Sμ.
    m_inv: M⁻¹, the conditional posterior covariance of r_i given (θ, u).
    m_inv_s: M⁻¹S, the weight on the prior mean (the shrinkage matrix).
    """

    at_mean: jax.Array
    curvature: jax.Array
    slope: jax.Array
    cond_mean: tuple[jax.Array, jax.Array]
    m_inv: Mat2
    m_inv_s: Mat2


class AdjustedData(NamedTuple):
    """A patient's data with the population fixed effects removed, from its Gram
    matrix and γ, (P,) arrays: n = Σω, wy = Wᵀ(y − Zγ), yy = ‖y − Zγ‖² (weighted),
    and the unscaled local Gram matrix WᵀW."""

    n: jax.Array
    wy0: jax.Array
    wy1: jax.Array
    yy: jax.Array
    wtw: Mat2


def adjusted_data(gamma: jax.Array, gram: jax.Array, config: ModelConfig) -> AdjustedData:
    """Per-patient statistics of y − Zγ (the patient step's data)."""
    d_w, d_z = config.local_dim, config.fixed_dim
    n = gram[:, 0, 0]
    wy0, wy1 = gram[:, 0, -1], gram[:, 1, -1]
    yy = gram[:, -1, -1]
    # Written out per fixed effect (d_z is tiny): batched dots would not fuse.
    for k in range(d_z):
        z_k, gamma_k = d_w + k, gamma[k]
        wy0 = wy0 - gram[:, 0, z_k] * gamma_k
        wy1 = wy1 - gram[:, 1, z_k] * gamma_k
        yy = yy - 2.0 * gram[:, z_k, -1] * gamma_k
        for m in range(d_z):
            yy = yy + gram[:, z_k, d_w + m] * gamma_k * gamma[m]
    wtw = Mat2(gram[:, 0, 0], gram[:, 0, 1], gram[:, 1, 0], gram[:, 1, 1])
    return AdjustedData(n, wy0, wy1, yy, wtw)


def patient_terms(
    theta: Hyper, gram: jax.Array, config: ModelConfig, covariates: jax.Array | None = None
) -> PatientTerms:
    """Integrate out each patient's local effects given θ (no draw axes on θ).

    gram: (P, d, d) standardised Gram matrices (model.evidence); covariates:
    (P, q) standardised patient covariates (None: none), so μ below is μ_i. With the data
    centred at the prior mean, h_μ = h − Pμ and c_μ = c − 2hᵀμ + μᵀPμ:

        log L_i(μ) = −½ n log(2πσ²) − ½ c_μ − ½ log|K| + ½ h_μᵀ M⁻¹ h_μ
        j_i = (S M⁻¹ P)_bb,   k_i = (S M⁻¹ h_μ)_b = (η_i − Ω_i μ)_b
        M⁻¹ = L K⁻¹ Lᵀ,   M⁻¹S = L K⁻¹ L⁻¹,   M⁻¹h + M⁻¹Sμ = M⁻¹h_μ + μ
    """
    n, wy0, wy1, yy, wtw = adjusted_data(theta.gamma, gram, config)
    variance = theta.sigma**2
    precision = Mat2(*(component / variance for component in wtw))
    mu0, mu1 = prior_means(theta, covariates)
    p_mu0, p_mu1 = precision.apply(mu0, mu1)
    h0, h1 = wy0 / variance - p_mu0, wy1 / variance - p_mu1
    c_mu = (yy - 2.0 * (wy0 * mu0 + wy1 * mu1)) / variance + mu0 * p_mu0 + mu1 * p_mu1

    chol = Mat2.from_array(theta.covariance_chol)  # L, shared by all patients
    lpl = chol.T @ precision @ chol
    k_inv, logdet_k = Mat2(1.0 + lpl.a, lpl.b, lpl.c, 1.0 + lpl.d).inverse_and_logdet()
    l_k_inv = chol @ k_inv
    m_inv = l_k_inv @ chol.T
    m_inv_s = l_k_inv @ _lower_inverse(chol)
    s_m_inv = m_inv_s.T
    m_inv_h0, m_inv_h1 = m_inv.apply(h0, h1)
    at_mean = (
        -0.5 * n * jnp.log(2.0 * jnp.pi * variance)
        - 0.5 * c_mu
        - 0.5 * logdet_k
        + 0.5 * (h0 * m_inv_h0 + h1 * m_inv_h1)
    )
    return PatientTerms(
        at_mean=at_mean,
        curvature=s_m_inv.c * precision.b + s_m_inv.d * precision.d,
        slope=s_m_inv.c * h0 + s_m_inv.d * h1,
        cond_mean=(m_inv_h0 + mu0, m_inv_h1 + mu1),
        m_inv=m_inv,
        m_inv_s=m_inv_s,
    )


def cohort_sums(
    terms: PatientTerms, cohort: jax.Array, num_cohorts: int
) -> tuple[jax.Array, jax.Array]:
    """J_g = Σ_i j_i and K_g = Σ_i k_i over each cohort's patients."""
    total_curvature = jax.ops.segment_sum(terms.curvature, cohort, num_segments=num_cohorts)
    total_slope = jax.ops.segment_sum(terms.slope, cohort, num_segments=num_cohorts)
    return total_curvature, total_slope


def cohort_posterior(
    tau_cohort: jax.Array, curvature: jax.Array, slope: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Posterior (mean, variance) of u_g ~ N(0, τ_u²) given a likelihood
    exp(k u − ½ j u²): variance τ_u²/(1 + τ_u² j), mean variance · k."""
    variance = tau_cohort**2 / (1.0 + tau_cohort**2 * curvature)
    return variance * slope, variance


def cohort_term(tau_cohort: jax.Array, curvature: jax.Array, slope: jax.Array) -> jax.Array:
    """Σ_g ½ τ_u² K_g² / (1 + τ_u² J_g) − ½ log(1 + τ_u² J_g): the cohort step."""
    prior_var = tau_cohort**2
    one_plus = 1.0 + prior_var * curvature
    return jnp.sum(0.5 * prior_var * slope**2 / one_plus - 0.5 * jnp.log(one_plus))


class GroupIndex(NamedTuple):
    """Where every patient sits at every grouping level, for the dense group step.

    index: (P, L) position of patient i's group at level l among all G groups
    (level 0 the cohorts, then each of ModelConfig.grouping_levels in order);
    sizes: (L,) static group count of each level (padded; G = Σ sizes).
    """

    index: jax.Array
    sizes: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.sizes)


def group_index(
    cohort: jax.Array, num_cohorts: int, groups: jax.Array, num_groups: tuple[int, ...]
) -> GroupIndex:
    """Cohort index (P,) and further levels' indices (P, L−1) in [0, num_groups[l])
    as positions among all levels' groups."""
    columns, offset = [cohort], num_cohorts
    for level, size in enumerate(num_groups):
        columns.append(groups[:, level] + offset)
        offset += size
    return GroupIndex(jnp.stack(columns, axis=-1), (num_cohorts, *num_groups))


def _group_scales(theta: Hyper, where: GroupIndex) -> jax.Array:
    """(G,) prior sd of every group: τ_u for cohorts, τ_l for level l's groups."""
    level_sds = jnp.concatenate([jnp.reshape(theta.tau_cohort, (1,)), theta.tau_groups])
    return level_sds[np.repeat(np.arange(len(where.sizes)), where.sizes)]


class GroupStep(NamedTuple):
    """The dense group step given θ (module docstring): ``value`` is
    ½ (S_u k)ᵀ B⁻¹ (S_u k) − ½ log|B|; the posterior of all G group effects is
    N(mean, cov); ``grad_scales`` (G,) the derivative of ``value`` in each
    group's prior sd (summed per level for ∂/∂τ_l)."""

    value: jax.Array
    mean: jax.Array
    cov: jax.Array
    grad_scales: jax.Array


def group_step(theta: Hyper, terms: PatientTerms, where: GroupIndex) -> GroupStep:
    """Integrate out every group effect at once, given the patients' j_i and k_i.

    ∂value/∂s_g, with x = B⁻¹ S_u k: x_g k_g − x_g (J S_u x)_g − (B⁻¹ S_u J)_gg
    (finite, and 0, at s_g = 0). Padding patients (j = k = 0) add nothing, and a
    group without patients leaves an identity row in B: it contributes 0 and
    keeps its prior.
    """
    total, levels = where.total, where.index.shape[1]
    curvature = jnp.zeros((total, total), dtype=terms.curvature.dtype)
    slope = jnp.zeros(total, dtype=terms.slope.dtype)
    for first in range(levels):
        rows = where.index[:, first]
        slope = slope + jax.ops.segment_sum(terms.slope, rows, num_segments=total)
        for second in range(levels):
            curvature = curvature.at[rows, where.index[:, second]].add(terms.curvature)
    scale = _group_scales(theta, where)
    identity = jnp.eye(total, dtype=curvature.dtype)
    chol = jnp.linalg.cholesky(identity + scale[:, None] * curvature * scale[None, :])
    b_inv = jax.scipy.linalg.cho_solve((chol, True), identity)
    scaled_slope = scale * slope
    whitened = b_inv @ scaled_slope
    value = 0.5 * scaled_slope @ whitened - jnp.sum(jnp.log(jnp.diagonal(chol)))
    grad_scales = (
        whitened * slope
        - whitened * (curvature @ (scale * whitened))
        - jnp.sum(b_inv * scale[None, :] * curvature, axis=1)
    )
    return GroupStep(
        value=value,
        mean=scale * whitened,
        cov=scale[:, None] * b_inv * scale[None, :],
        grad_scales=grad_scales,
    )


def shift_moments(mean: jax.Array, cov: jax.Array, index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """E[s_i] = a_iᵀ mean and Var[s_i] = a_iᵀ cov a_i of each patient's total group
    shift, from the groups' joint posterior; index (P, L) as GroupIndex.index."""
    levels = index.shape[1]
    shift_mean = sum(mean[index[:, level]] for level in range(levels))
    shift_var = sum(
        cov[index[:, first], index[:, second]]
        for first in range(levels)
        for second in range(levels)
    )
    return shift_mean, shift_var


def _grouping(
    config: ModelConfig,
    cohort: jax.Array,
    num_cohorts: int,
    groups: jax.Array | None,
    num_groups: tuple[int, ...],
) -> GroupIndex | None:
    """The GroupIndex when the model has further grouping levels, else None."""
    if not config.grouping_levels:
        return None
    count = len(config.grouping_levels)
    if groups is None or groups.ndim != 2 or groups.shape[1] != count or len(num_groups) != count:
        raise ValueError(
            f"the model has {count} further grouping level(s) "
            f"({', '.join(config.grouping_levels)}): pass groups (P, {count}) and num_groups"
        )
    return group_index(cohort, num_cohorts, groups, tuple(num_groups))


def sum_over_patients(values: jax.Array, axis: int = 0) -> jax.Array:
    """Sum of per-patient values, materialised first.

    The barrier keeps XLA (CPU) from fusing the whole elementwise patient step
    into the reduction: that fused reduction ran ~6× slower than an elementwise
    loop followed by a plain sum (15 ms against 2.6 ms at 131k patients).
    """
    return jnp.sum(jax.lax.optimization_barrier(values), axis=axis)


def _collapsed_value(
    theta: Hyper,
    gram: jax.Array,
    cohort: jax.Array,
    num_cohorts: int,
    config: ModelConfig,
    covariates: jax.Array | None = None,
    groups: jax.Array | None = None,
    num_groups: tuple[int, ...] = (),
) -> jax.Array:
    """log p(all evidence | θ): patient step, then the cohort step, or the dense
    group step with further grouping levels (module docstring)."""
    terms = patient_terms(theta, gram, config, covariates)
    total = sum_over_patients(terms.at_mean)
    where = _grouping(config, cohort, num_cohorts, groups, num_groups)
    if where is not None:
        return total + group_step(theta, terms, where).value
    if not config.cohort_level:
        return total
    curvature, slope = cohort_sums(terms, cohort, num_cohorts)
    return total + cohort_term(theta.tau_cohort, curvature, slope)


def collapsed_loglik(
    theta: Hyper,
    gram: jax.Array,
    cohort: jax.Array,
    num_cohorts: int,
    config: ModelConfig,
    covariates: jax.Array | None = None,
    groups: jax.Array | None = None,
    num_groups: tuple[int, ...] = (),
) -> jax.Array:
    """log p(all evidence | θ) with patients' and groups' effects integrated out.

    gram: (P, d, d); cohort: (P,) int in [0, num_cohorts); covariates: (P, q)
    standardised patient covariates or None (theta.coef then None too). With
    further grouping levels (config.grouping_levels, theta.tau_groups): groups
    (P, L) int, column l in [0, num_groups[l]). Cost O(P) (plus O(G³) for the
    dense group step).

    Differentiable in θ only (gram, cohort and covariates are data and get zero cotangents):
    reverse mode uses the closed-form gradient of collapsed_loglik_and_grad, not
    autodiff through the patient step, which XLA on CPU runs as ~160 separate
    memory-bound loops over patients. No forward-mode (jvp) derivatives.
    """
    return _collapsed_loglik(
        theta, gram, cohort, covariates, groups, num_cohorts, tuple(num_groups), config
    )


@partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _collapsed_loglik(
    theta: Hyper,
    gram: jax.Array,
    cohort: jax.Array,
    covariates: jax.Array | None,
    groups: jax.Array | None,
    num_cohorts: int,
    num_groups: tuple[int, ...],
    config: ModelConfig,
) -> jax.Array:
    return _collapsed_value(
        theta, gram, cohort, num_cohorts, config, covariates, groups, num_groups
    )


def collapsed_loglik_and_grad(
    theta: Hyper,
    gram: jax.Array,
    cohort: jax.Array,
    num_cohorts: int,
    config: ModelConfig,
    covariates: jax.Array | None = None,
    groups: jax.Array | None = None,
    num_groups: tuple[int, ...] = (),
) -> tuple[jax.Array, Hyper]:
    """log p(all evidence | θ) and its gradient in θ, by Fisher's identity.

    ∇θ log p(y | θ) = E[∇θ log p(y, r, u | θ) | y, θ]: the gradient of the
    complete-data log density averaged over the exact posterior of every patient's
    local effects r_i and cohort deviation u_g. With δ_i = r_i − μ − e_b u_g:

        ∂/∂μ   = S Σ_i E[δ_i],   ∂/∂B = S Σ_i E[δ_i] x_iᵀ
        ∂/∂Σ   = ½ Σ_i (S E[δ_i δ_iᵀ] S − S),   ∂/∂L = 2 (∂/∂Σ) L   (Σ = L Lᵀ)
        ∂/∂σ²  = Σ_i (E[RSS_i] / σ² − n_i) / (2σ²)
        ∂/∂γ   = Σ_i (Zᵀy − ZᵀZ γ − ZᵀW E[r_i]) / σ²
        ∂/∂τ_u = Σ_g τ_u (K_g² / (1 + τ_u² J_g)² − J_g / (1 + τ_u² J_g))

    where, with u_g | y ~ N(m_g, v_g) and l_i = M⁻¹S e_b, E[r_i] = M⁻¹h + M⁻¹Sμ +
    l_i m_g, Cov[r_i] = M⁻¹ + v_g l_i l_iᵀ, E[δ_i] = M⁻¹h_μ + (l_i − e_b) m_g and
    Cov[δ_i] = M⁻¹ + v_g (l_i − e_b)(l_i − e_b)ᵀ. With further grouping levels
    (m_g, v_g) are the moments E[s_i], Var[s_i] of the patient's total group shift
    (each patient's terms need only that shift's marginal) and ∂/∂τ_l sums the
    dense group step's derivative in each of level l's prior sds (group_step).
    A patient without evidence has
    E[δδᵀ] = Σ and E[δ] = 0, so padding contributes zero here too. Forgetting
    (a power likelihood) keeps the identity: it holds for any unnormalised density.

    Every per-patient quantity is elementwise, then summed once: a few passes over
    the patients instead of the dozens autodiff produces. The correlation factor
    is lower triangular by construction, so its upper entry gets no gradient.
    """
    data = adjusted_data(theta.gamma, gram, config)
    terms = patient_terms(theta, gram, config, covariates)
    total = sum_over_patients(terms.at_mean)
    where = _grouping(config, cohort, num_cohorts, groups, num_groups)
    grad_tau_groups = None
    if where is not None:
        step = group_step(theta, terms, where)
        total = total + step.value
        per_level = jax.ops.segment_sum(
            step.grad_scales,
            jnp.asarray(np.repeat(np.arange(len(where.sizes)), where.sizes)),
            num_segments=len(where.sizes),
        )
        grad_tau_cohort = per_level[0].reshape(jnp.shape(theta.tau_cohort))
        grad_tau_groups = per_level[1:]
        u_mean, u_var = shift_moments(step.mean, step.cov, where.index)
    elif config.cohort_level:
        curvature, slope = cohort_sums(terms, cohort, num_cohorts)
        total = total + cohort_term(theta.tau_cohort, curvature, slope)
        one_plus = 1.0 + theta.tau_cohort**2 * curvature
        grad_tau_cohort = jnp.sum(
            theta.tau_cohort * (slope**2 / one_plus**2 - curvature / one_plus)
        )
        u_mean, u_var = cohort_posterior(theta.tau_cohort, curvature, slope)
        u_mean, u_var = u_mean[cohort], u_var[cohort]
    else:
        grad_tau_cohort = jnp.zeros_like(theta.tau_cohort)
        u_mean = u_var = jnp.zeros_like(terms.at_mean)

    mu0, mu1 = prior_means(theta, covariates)
    load0, load1 = terms.m_inv_s.b, terms.m_inv_s.d  # l = M⁻¹S e_b
    mean_r0 = terms.cond_mean[0] + load0 * u_mean
    mean_r1 = terms.cond_mean[1] + load1 * u_mean
    # δ = r − μ − e_b u: mean and second moment
    dev0, dev1 = load0, load1 - 1.0  # l − e_b
    mean_d0 = terms.cond_mean[0] - mu0 + dev0 * u_mean
    mean_d1 = terms.cond_mean[1] - mu1 + dev1 * u_mean
    m_inv = terms.m_inv
    dd00 = m_inv.a + u_var * dev0 * dev0 + mean_d0 * mean_d0
    dd01 = m_inv.b + u_var * dev0 * dev1 + mean_d0 * mean_d1
    dd11 = m_inv.d + u_var * dev1 * dev1 + mean_d1 * mean_d1
    # E[RSS] = ‖y − Zγ‖² − 2 E[r]ᵀWᵀ(y − Zγ) + tr(WᵀW E[r rᵀ])
    rr00 = m_inv.a + u_var * load0 * load0 + mean_r0 * mean_r0
    rr01 = m_inv.b + u_var * load0 * load1 + mean_r0 * mean_r1
    rr11 = m_inv.d + u_var * load1 * load1 + mean_r1 * mean_r1
    wtw = data.wtw
    rss = (
        data.yy
        - 2.0 * (mean_r0 * data.wy0 + mean_r1 * data.wy1)
        + wtw.a * rr00
        + (wtw.b + wtw.c) * rr01
        + wtw.d * rr11
    )
    columns = [mean_d0, mean_d1, dd00, dd01, dd11, rss, data.n]
    d_w, d_z = config.local_dim, config.fixed_dim
    for k in range(d_z):  # Zᵀ(y − Zγ − W E[r]) per fixed effect
        z_k = d_w + k
        residual = gram[:, z_k, -1] - gram[:, 0, z_k] * mean_r0 - gram[:, 1, z_k] * mean_r1
        for m in range(d_z):
            residual = residual - gram[:, z_k, d_w + m] * theta.gamma[m]
        columns.append(residual)
    num_covariates = 0 if theta.coef is None or covariates is None else covariates.shape[-1]
    for k in range(num_covariates):  # Σ_i E[δ_i] x_ik, for ∂/∂B
        columns.extend([mean_d0 * covariates[:, k], mean_d1 * covariates[:, k]])
    sums = sum_over_patients(jnp.stack(columns, axis=0), axis=-1)
    sum_d = jnp.stack([sums[0], sums[1]])
    sum_dd = jnp.array([[sums[2], sums[3]], [sums[3], sums[4]]])
    sum_rss, sum_n = sums[5], sums[6]

    variance = theta.sigma**2
    chol = theta.covariance_chol
    chol_inv = jax.scipy.linalg.solve_triangular(chol, jnp.eye(2, dtype=chol.dtype), lower=True)
    precision = chol_inv.T @ chol_inv  # S = Σ⁻¹
    num_rows = gram.shape[0]
    grad_sigma_matrix = 0.5 * (precision @ sum_dd @ precision - num_rows * precision)
    grad_chol = jnp.tril(2.0 * grad_sigma_matrix @ chol)
    grad_variance = 0.5 * (sum_rss / variance - sum_n) / variance
    grad_gamma = sums[7 : 7 + d_z] / variance if d_z else jnp.zeros_like(theta.gamma)
    grad_coef = None
    if theta.coef is not None:
        if num_covariates:
            moments = sums[7 + d_z :].reshape(num_covariates, 2).T  # (2, q): Σ E[δ] xᵀ
            grad_coef = precision @ moments
        else:
            grad_coef = jnp.zeros_like(theta.coef)
    grad = Hyper(
        mu=precision @ sum_d,
        tau=jnp.sum(grad_chol * theta.corr_chol, axis=-1),
        corr_chol=jnp.tril(grad_chol * theta.tau[:, None]),
        tau_cohort=grad_tau_cohort,
        sigma=2.0 * theta.sigma * grad_variance,
        gamma=grad_gamma,
        coef=grad_coef,
        tau_groups=None if theta.tau_groups is None else grad_tau_groups,
    )
    return total, grad


def _collapsed_fwd(
    theta: Hyper,
    gram: jax.Array,
    cohort: jax.Array,
    covariates: jax.Array | None,
    groups: jax.Array | None,
    num_cohorts: int,
    num_groups: tuple[int, ...],
    config: ModelConfig,
) -> tuple[jax.Array, tuple[Hyper, jax.Array | None]]:
    value, grad = collapsed_loglik_and_grad(
        theta, gram, cohort, num_cohorts, config, covariates, groups, num_groups
    )
    return value, (grad, covariates)


def _collapsed_bwd(
    num_cohorts: int,
    num_groups: tuple[int, ...],
    config: ModelConfig,
    residuals: tuple[Hyper, jax.Array | None],
    cotangent: jax.Array,
) -> tuple[Hyper, None, None, jax.Array | None, None]:
    del num_cohorts, num_groups, config
    grad, covariates = residuals
    # Data get zero cotangents (None for gram and the integer group indices).
    no_covariates = None if covariates is None else jnp.zeros_like(covariates)
    return jax.tree.map(lambda g: cotangent * g, grad), None, None, no_covariates, None


_collapsed_loglik.defvjp(_collapsed_fwd, _collapsed_bwd)


class EffectComponents(NamedTuple):
    """Posterior of each patient's effect b_i given one θ (standardised units):
    Gaussian with ``mean`` and ``variance``; ``cohort_mean`` is the posterior mean
    of the cohort deviation u_g(i); ``shrinkage`` is (M⁻¹S)_bb, the weight the
    conditional mean puts on the prior (1: all pooled, 0: all the patient's own data);
    ``expected`` is (μ_i)_b, the population's effect for the patient's covariates.
    """

    mean: jax.Array
    variance: jax.Array
    cohort_mean: jax.Array
    shrinkage: jax.Array
    expected: jax.Array


def cohort_effect_posterior(
    theta: Hyper,
    gram: jax.Array,
    cohort: jax.Array,
    num_cohorts: int,
    config: ModelConfig,
    covariates: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Posterior (mean, variance) of every cohort deviation u_g given θ and all
    evidence, shapes (num_cohorts,). Zeros without a cohort level."""
    if not config.cohort_level:
        zeros = jnp.zeros(num_cohorts, dtype=gram.dtype)
        return zeros, zeros
    terms = patient_terms(theta, gram, config, covariates)
    curvature, slope = cohort_sums(terms, cohort, num_cohorts)
    return cohort_posterior(theta.tau_cohort, curvature, slope)


def group_effect_posterior(
    theta: Hyper,
    gram: jax.Array,
    cohort: jax.Array,
    num_cohorts: int,
    config: ModelConfig,
    covariates: jax.Array | None = None,
    groups: jax.Array | None = None,
    num_groups: tuple[int, ...] = (),
) -> tuple[jax.Array, jax.Array]:
    """Joint posterior (mean (G,), covariance (G, G)) of every group effect at
    every level given θ and all evidence, with further grouping levels: the
    cohorts first, then each level's groups (GroupIndex). Crossed levels are
    correlated a posteriori, so patients need the covariance (shift_moments)."""
    where = _grouping(config, cohort, num_cohorts, groups, num_groups)
    if where is None:
        raise ValueError("group_effect_posterior needs further grouping levels")
    step = group_step(theta, patient_terms(theta, gram, config, covariates), where)
    return step.mean, step.cov


def patient_shift_posterior(
    theta: Hyper,
    gram: jax.Array,
    cohort: jax.Array,
    num_cohorts: int,
    config: ModelConfig,
    covariates: jax.Array | None = None,
    groups: jax.Array | None = None,
    num_groups: tuple[int, ...] = (),
) -> tuple[jax.Array, jax.Array]:
    """Posterior (mean, variance) of every patient's total group shift of the
    effect given θ and all evidence, (P,) each: the cohort deviation u_g(i) with
    one level (zeros without), Σ_l u_{l, g_l(i)} with several. What
    patient_effects_given_theta takes as cohort_mean and cohort_variance."""
    where = _grouping(config, cohort, num_cohorts, groups, num_groups)
    if where is None:
        mean, variance = cohort_effect_posterior(
            theta, gram, cohort, num_cohorts, config, covariates
        )
        return mean[cohort], variance[cohort]
    mean, cov = group_effect_posterior(
        theta, gram, cohort, num_cohorts, config, covariates, groups, num_groups
    )
    return shift_moments(mean, cov, where.index)


def patient_effects_given_theta(
    theta: Hyper,
    gram: jax.Array,
    cohort_mean: jax.Array,
    cohort_variance: jax.Array,
    config: ModelConfig,
    covariates: jax.Array | None = None,
) -> EffectComponents:
    """Exact Gaussian posterior of each patient's effect given θ and the posterior
    N(cohort_mean, cohort_variance) of its cohort's deviation (per patient, (P,)).

    r_i | θ, u, data ~ N(M⁻¹h + M⁻¹S(μ + e_b u), M⁻¹), so marginally over u_g:
    mean M⁻¹h + M⁻¹Sμ + (M⁻¹S)e_b m_g, covariance M⁻¹ + v_g (M⁻¹S e_b)(M⁻¹S e_b)ᵀ.
    With the cohort posterior computed from all evidence (cohort_effect_posterior)
    this is the exact joint-posterior marginal. covariates: (P, q) or None, as
    for patient_terms.
    """
    terms = patient_terms(theta, gram, config, covariates)
    loading = terms.m_inv_s.d  # (M⁻¹S)_bb
    mean = terms.cond_mean[EFFECT] + loading * cohort_mean
    return EffectComponents(
        mean=mean,
        variance=terms.m_inv.d + cohort_variance * loading**2,
        cohort_mean=cohort_mean,
        shrinkage=loading,
        expected=jnp.broadcast_to(prior_means(theta, covariates)[EFFECT], mean.shape),
    )
