"""Several measures of one patient at once: a joint latent-trait model whose
patient effects are correlated across measures.

Model, standardised units (each measure m = 1..M its own standardisation),
patient i, reading t of measure m:

    y_imt = a_im + b_im x_imt + z_imtᵀ γ_m + ε_imt,   ε_imt ~ N(0, σ_m²)
    r_i = (a_i1, b_i1, …, a_iM, b_iM) ~ N(μ, Σ),   Σ = diag(τ) Ω diag(τ)

The whole patient block r_i (dimension D = 2M, intercepts included) shares one
covariance: τ holds every intercept's and effect's between-patient sd (as each
measure's model has); the correlation Ω has two M×M blocks and no
intercept-effect correlation:

    Ω[2m, 2n] = Ω_a[m, n],   Ω[2m+1, 2n+1] = Ω_b[m, n],   Ω[2m, 2n+1] = 0
    Ω_a ~ LKJ(M, η_a) (intercepts, site "L_intercepts"),   η_a = priors.lkj_concentration
    Ω_b ~ π LKJ(M, η_s) + (1 − π) LKJ(M, η_b) (effects, site "L_effects")
          π = priors.effect_correlation_spike_weight (0.2), η_s = …_spike_concentration
          (50), η_b = priors.effect_correlation_concentration (2)

Ω_b is the between-measure correlation of the effects. Its Cholesky factor is
the interleaving of blockdiag(L_a, L_b): L[2m, 2n] = L_a[m, n],
L[2m+1, 2n+1] = L_b[m, n], zero elsewhere; it is lower triangular (2m ≥ 2n iff
m ≥ n, and likewise for 2m+1, 2n+1) and L Lᵀ = Ω (``interleave_chol``). The
LKJ(M) marginal of each correlation is Beta(η − 1 + M/2, same) on (−1, 1):
sd 0.41 for η = 2, M = 3 (0.45 for M = 2, a single measure's 2×2 prior), 0.10
for η = 50. The prior of Ω_b is a mixture, a spike at independence (η_s = 50)
next to a diffuse slab (η_b = 2), for this reason (benchmarks/README.md §12):
with no correlation in the truth, under the slab alone a weakly measured
effect pays an Occam price. A correlation with effect m is identified only when
τ_b,m is large enough to be seen, so the posterior pays for the slab's volume
by pulling τ_b,m down, and its intervals undercover against per-measure fits
(by NUTS on both models as by SVI). A concentrated LKJ removes that price but
pulls real correlations towards 0, and with them the strength a sparse measure
borrows. Under the mixture the price is bounded by log(1/π): data without
correlation sit in the spike, and data with correlation in the slab, which
costs them at most log(1/(1 − π)). There are no grouping levels beyond the
cohort and no patient covariates (each measure's own model has them; here they
are not implemented).

**Cohort level** (optional, all measures or none). Patient i in cohort g:

    r_i ~ N(μ + E u_g, Σ),   u_g ~ N(0, T²),   T = diag(τ_u,1..τ_u,M)

E (D×M) puts u_gm on measure m's effect (E[2m+1, m] = 1): u_g shifts each
measure's effect mean, each measure with its own between-cohort sd τ_u,m
(HalfNormal(priors.cohort_scale), as a single measure's τ_u).

**Patient step.** A measure's Gram matrix gives its Gaussian likelihood of
(a_im, b_im) given θ (model.likelihood.adjusted_data): precision
P_im = W_mᵀW_m/σ_m², information h_im = W_mᵀ(y_m − Z_mγ_m)/σ_m², c_im and n_im.
Measures are independent given r_i, so patient i's likelihood of r_i has the
block-diagonal precision P_i = blockdiag(P_i1..P_iM) and h_i = (h_i1..h_iM).
Integrating r_i ~ N(μ, Σ), Σ = L Lᵀ, exactly (the dense form of
model.likelihood's 2×2 step), with h_μ = h − Pμ, c_μ = Σ_m c_im − 2hᵀμ + μᵀPμ:

    log L_i = −½ Σ_m n_im log(2πσ_m²) − ½ c_μ − ½ log|K| + ½ ‖C⁻¹Lᵀh_μ‖²
    K = I + LᵀPL = C Cᵀ   (det K ≥ 1: well conditioned for any τ)
    r_i | y, θ ~ N(μ + L K⁻¹ Lᵀ h_μ, L K⁻¹ Lᵀ)

The D×D Cholesky factor C is unrolled over (P,) arrays, so the step is
elementwise over patients like the 2×2 one (no batched LAPACK calls). A patient
without readings of a measure has P_im = 0 there, and one without any readings
contributes exactly zero: padding needs no mask.

**Cohort step.** log L_i(μ + δ) is quadratic in the shift δ of the prior mean:
with h_δ = h_μ − Pδ in the patient step,

    log L_i(μ + δ) − log L_i(μ)
        = δᵀ(h_μ − P L K⁻¹ Lᵀ h_μ) − ½ δᵀ(P − P L K⁻¹ Lᵀ P)δ

and P − P L K⁻¹ Lᵀ P = (P⁻¹ + Σ)⁻¹ (Woodbury), written without inverting P or
L (P may be singular, L → 0 as τ → 0). With V = P L C⁻ᵀ, its row for measure
m's effect z_m = C⁻¹ Lᵀ P e_bm (one unrolled forward solve; P e_bm has two
entries), and δ = E u:

    J_i[m, n] = P_i[bm, bn] − z_mᵀ z_n   (P_i[bm, bn] = 0 for m ≠ n)
    k_i[m] = h_μ[bm] − z_mᵀ (C⁻¹ Lᵀ h_μ)

Summed over the cohort (segment_sum): J_g = Σ_i J_i, K_g = Σ_i k_i, and with
B_g = I + T J_g T = F_g F_gᵀ (M×M, unrolled Cholesky over (G,) arrays; det ≥ 1)

    log L = Σ_i log L_i(μ) + Σ_g ½ ‖F_g⁻¹ T K_g‖² − Σ_g log|F_g|
    u_g | y, θ ~ N(T B_g⁻¹ T K_g, T B_g⁻¹ T)

(M = 1: a single measure's ½ τ_u² K² / (1 + τ_u² J) − ½ log(1 + τ_u² J)). An
empty cohort has J_g = 0, K_g = 0: it contributes 0 and keeps its prior.
Patient posterior given u: r_i | u ~ N(μ + Eu + L K⁻¹ Lᵀ(h_μ − P E u), L K⁻¹ Lᵀ)
= N(m_i + A_i u, L K⁻¹ Lᵀ) with m_i = μ + L K⁻¹ Lᵀ h_μ (the step above),
A_i = E − L C⁻ᵀ Z_i, Z_i = (z_1..z_M); over u_g's posterior N(m_g, V_g) from
all evidence: mean m_i + A_i m_g, covariance L K⁻¹ Lᵀ + A_i V_g A_iᵀ, the
exact marginal of the joint posterior (as model.likelihood's
patient_effects_given_theta).

**Fit.** θ = (μ, τ, Ω_a, Ω_b, σ, γ, τ_u) by model.population's PopulationFitter
(the same whitened full-rank SVI) on ``joint_model``; gradients are reverse-mode autodiff
of the value above. Patient posteriors are Gaussian given θ and mixed over the
draws of θ as model.scores does (``JointPatients``).

**Latent responsiveness.** ρ_i = (1/M) Σ_m s_m (b_im − μ_bm) / τ_bm: the
patient's effect deviation (its cohort's shift included) on each measure in
units of that measure's between-patient sd, signed so that benefit is positive
(s_m = +1 when higher is better), averaged over measures. It is 0 for the typical patient, so
P(ρ_i > 0) is the probability the patient responds more than the population.
Linear in r_i, it is Gaussian given θ: mean wᵀ(E r_i − μ), variance wᵀ Cov(r_i) w.

**Common factor.** How much one trait carries the benefit on every measure is
read off Ω_b per draw (``common_factor``): the loadings √λ₁ v₁ of the principal
axis of S Ω_b S and the share λ₁ / M of the standardised benefits' variance it
explains, published with their posterior intervals.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from pydantic import BaseModel, ConfigDict, model_validator

from model.config import ModelConfig, PriorConfig, Standardization, SVIConfig
from model.events import Events
from model.evidence import events_stats
from model.likelihood import EFFECT, Mat2, adjusted_data, sum_over_patients
from model.population import (
    MIN_COHORT_BUCKET,
    MIN_PATIENT_BUCKET,
    Evidence,
    FitState,
    PopulationFitter,
    UpdateInfo,
    bucket_size,
)
from model.scores import describe, mixture_quantiles

INTERVAL_PROBS = np.array([0.05, 0.95])


class JointConfig(BaseModel):
    """Structure of the joint model: one ModelConfig per measure (its
    standardisation and whether it has a time trend; all measures alike) and
    the priors of θ (PriorConfig, shared). The measures have a cohort level
    all or none; no further grouping levels, covariates or time-varying
    covariates, and are Gaussian with partial pooling."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    measures: tuple[ModelConfig, ...]
    priors: PriorConfig = PriorConfig()

    @model_validator(mode="after")
    def _supported(self) -> JointConfig:
        if not 2 <= len(self.measures) <= 6:
            raise ValueError(f"the joint model takes 2-6 measures, got {len(self.measures)}")
        for config in self.measures:
            unsupported = [
                name
                for name, present in (
                    ("grouping levels", bool(config.grouping_levels)),
                    ("patient covariates", bool(config.covariates)),
                    ("time-varying covariates", bool(config.time_covariates)),
                    ("a non-Gaussian family", config.family != "gaussian"),
                    ("fixed effect pooling", config.effect_pooling != "partial"),
                    ("forgetting", config.half_life is not None),
                )
                if present
            ]
            if unsupported:
                raise ValueError(f"the joint model has no {', '.join(unsupported)}")
        if len({config.time_trend for config in self.measures}) != 1:
            raise ValueError("the joint model's measures must all have a time trend or none")
        if len({config.cohort_level for config in self.measures}) != 1:
            raise ValueError("the joint model's measures must all have a cohort level or none")
        return self

    @property
    def cohort_level(self) -> bool:
        """u_g ∈ R^M shifts the effects of cohort g's patients (module docstring)."""
        return self.measures[0].cohort_level

    @property
    def num_measures(self) -> int:
        return len(self.measures)

    @property
    def block_dim(self) -> int:
        """D = 2M: every measure's (intercept, effect)."""
        return 2 * len(self.measures)

    @property
    def fixed_dim(self) -> int:
        return self.measures[0].fixed_dim

    @property
    def stat_dim(self) -> int:
        return self.measures[0].stat_dim

    # What PopulationFitter checks the evidence against: none of either.
    @property
    def num_covariates(self) -> int:
        return 0

    @property
    def grouping_levels(self) -> tuple[str, ...]:
        return ()

    @property
    def structure(self) -> JointConfig:
        """This config with each measure's structure (default standardisation):
        all the fit of standardised evidence depends on (static jit argument)."""
        return self.model_copy(
            update={"measures": tuple(config.structure for config in self.measures)}
        )


class JointHyper(NamedTuple):
    """θ of the joint model, standardised units; may carry leading draw axes.

    mu: (..., M, 2) population mean of each measure's (intercept, effect)
    tau: (..., D) between-patient sds, ordered (a_1, b_1, …, a_M, b_M)
    corr_chol: (..., D, D) Cholesky factor of their correlation Ω (module
        docstring: the interleaved blockdiag(L_a, L_b), ``interleave_chol``)
    sigma: (..., M) residual sds
    gamma: (..., M, d_z) each measure's fixed effects (time trend)
    tau_cohort: (..., M) between-cohort sd τ_u of each measure's effect; zeros
        (or None) without a cohort level
    """

    mu: jax.Array
    tau: jax.Array
    corr_chol: jax.Array
    sigma: jax.Array
    gamma: jax.Array
    tau_cohort: jax.Array | None = None

    @property
    def covariance_chol(self) -> jax.Array:
        """L with Σ = L Lᵀ."""
        return self.tau[..., :, None] * self.corr_chol

    @property
    def effect_correlation(self) -> jax.Array:
        """(..., M, M) Ω_b, the correlation of the effects across measures."""
        omega = self.corr_chol @ jnp.swapaxes(self.corr_chol, -1, -2)
        return omega[..., EFFECT::2, EFFECT::2]


def interleave_chol(intercepts: jax.Array, effects: jax.Array) -> jax.Array:
    """(..., D, D) Cholesky factor of Ω from the intercepts' and effects'
    (..., M, M) factors L_a, L_b: blockdiag(L_a, L_b) with rows and columns in
    the block order (a_1, b_1, …, a_M, b_M), i.e. L[2m, 2n] = L_a[m, n],
    L[2m+1, 2n+1] = L_b[m, n] and 0 elsewhere. Lower triangular, and L Lᵀ has
    Ω_a and Ω_b interleaved with no intercept-effect correlation."""
    count = intercepts.shape[-1]
    batch = jnp.broadcast_shapes(intercepts.shape[:-2], effects.shape[:-2])
    dtype = jnp.result_type(intercepts, effects)
    chol = jnp.zeros((*batch, 2 * count, 2 * count), dtype=dtype)
    chol = chol.at[..., 0::2, 0::2].set(intercepts)
    return chol.at[..., 1::2, 1::2].set(effects)


def effect_correlation_prior(count: int, priors: PriorConfig) -> dist.Distribution:
    """The prior of the effects' correlation factor L_b: LKJ(M, η_b), or with
    ``effect_correlation_spike_weight`` π > 0 the mixture π LKJ(M, η_spike) +
    (1 − π) LKJ(M, η_b), whose density near independence does not fall with
    the slab's spread (PriorConfig)."""
    slab = dist.LKJCholesky(count, priors.effect_correlation_concentration)
    weight = priors.effect_correlation_spike_weight
    if weight == 0.0:
        return slab
    spike = dist.LKJCholesky(count, priors.effect_correlation_spike_concentration)
    return dist.MixtureGeneral(
        dist.Categorical(probs=jnp.array([weight, 1.0 - weight])), [spike, slab]
    )


def _correlation_priors(config: JointConfig) -> jax.Array:
    """The two LKJ(M) priors (module docstring); returns the interleaved factor."""
    count, priors = config.num_measures, config.priors
    intercepts = numpyro.sample("L_intercepts", dist.LKJCholesky(count, priors.lkj_concentration))
    effects = numpyro.sample("L_effects", effect_correlation_prior(count, priors))
    return interleave_chol(intercepts, effects)


class BlockData(NamedTuple):
    """A patient block's Gaussian likelihood given θ, each entry a (P,) array:
    ``precision[m]`` measure m's 2×2 block of P_i (Mat2), ``information`` the D
    entries of h_i, ``c`` Σ_m c_im and ``log_norm`` −½ Σ_m n_im log(2πσ_m²)."""

    precision: list[Mat2]
    information: list[jax.Array]
    c: jax.Array
    log_norm: jax.Array


def block_data(theta: JointHyper, gram: jax.Array, config: JointConfig) -> BlockData:
    """Each measure's statistics of y − Zγ (model.likelihood.adjusted_data) put
    together into the patient block's likelihood. gram: (P, M, d, d)."""
    precision, information, c, log_norm = [], [], 0.0, 0.0
    for m, measure in enumerate(config.measures):
        data = adjusted_data(theta.gamma[m], gram[:, m], measure)
        variance = theta.sigma[m] ** 2
        precision.append(Mat2(*(component / variance for component in data.wtw)))
        information.extend([data.wy0 / variance, data.wy1 / variance])
        c = c + data.yy / variance
        log_norm = log_norm - 0.5 * data.n * jnp.log(2.0 * jnp.pi * variance)
    return BlockData(precision, information, c, log_norm)


def _cholesky_rows(entry: Callable[[int, int], jax.Array], dim: int) -> list[list[jax.Array]]:
    """Lower Cholesky factor of positive-definite D×D matrices given by
    ``entry(i, j)`` (i ≥ j, (P,) arrays), unrolled over the D(D+1)/2 entries:
    elementwise work XLA fuses, where batched LAPACK calls of tiny matrices cost
    a call per patient."""
    rows: list[list[jax.Array]] = [[] for _ in range(dim)]
    for j in range(dim):
        root = jnp.sqrt(entry(j, j) - sum((rows[j][k] ** 2 for k in range(j)), start=0.0))
        rows[j].append(root)
        for i in range(j + 1, dim):
            off = entry(i, j) - sum((rows[i][k] * rows[j][k] for k in range(j)), start=0.0)
            rows[i].append(off / root)
    return rows


def _forward_solve(rows: list[list[jax.Array]], vector: list[jax.Array]) -> list[jax.Array]:
    """z with C z = v, C lower triangular given by rows (unrolled, (P,) arrays)."""
    solution: list[jax.Array] = []
    for i, row in enumerate(rows):
        remainder = vector[i] - sum((row[k] * solution[k] for k in range(i)), start=0.0)
        solution.append(remainder / row[i])
    return solution


class BlockTerms(NamedTuple):
    """Per-patient results of integrating out the patient block given θ:
    ``value`` log L_i (P,); ``whitened`` C⁻¹Lᵀh_μ as D (P,) arrays; ``factor``
    the rows of C; ``h_mu`` the D entries of h_μ; ``precision`` each measure's
    2×2 block of P_i (BlockData)."""

    value: jax.Array
    whitened: list[jax.Array]
    factor: list[list[jax.Array]]
    h_mu: list[jax.Array]
    precision: list[Mat2]


def block_terms(theta: JointHyper, gram: jax.Array, config: JointConfig) -> BlockTerms:
    """The patient step (module docstring) for every patient; θ without draw axes.

    Written out entry by entry over (P,) arrays: LᵀPL sums, for each measure's
    2×2 block of P, the products with L's rows of that block (L is lower
    triangular, so entries above its diagonal are skipped), then C and C⁻¹Lᵀh_μ
    are unrolled. Every step is elementwise over patients."""
    data = block_data(theta, gram, config)
    dim = config.block_dim
    mu = theta.mu.reshape(-1)
    chol = theta.covariance_chol
    h_mu, c_mu = [], data.c
    for m, block in enumerate(data.precision):
        p_mu0, p_mu1 = block.apply(mu[2 * m], mu[2 * m + 1])
        h0, h1 = data.information[2 * m], data.information[2 * m + 1]
        h_mu.extend([h0 - p_mu0, h1 - p_mu1])
        c_mu = c_mu - 2.0 * (h0 * mu[2 * m] + h1 * mu[2 * m + 1])
        c_mu = c_mu + mu[2 * m] * p_mu0 + mu[2 * m + 1] * p_mu1
    entries = {}  # (j, k), j ≥ k: (I + LᵀPL)_jk
    for j in range(dim):
        for k in range(j + 1):
            total = jnp.full_like(data.c, float(j == k))
            for m, block in enumerate(data.precision):
                rows = (2 * m, 2 * m + 1)
                for u, a in enumerate(rows):
                    for v, b in enumerate(rows):
                        if a >= j and b >= k:  # L[a, j] and L[b, k] not structurally 0
                            total = total + chol[a, j] * block[2 * u + v] * chol[b, k]
            entries[j, k] = total
    factor = _cholesky_rows(lambda j, k: entries[j, k], dim)
    projected = [sum(chol[a, j] * h_mu[a] for a in range(j, dim)) for j in range(dim)]  # Lᵀh_μ
    whitened = _forward_solve(factor, projected)
    logdet = 2.0 * sum(jnp.log(factor[j][j]) for j in range(dim))
    value = data.log_norm - 0.5 * c_mu - 0.5 * logdet + 0.5 * sum(part**2 for part in whitened)
    return BlockTerms(value, whitened, factor, h_mu, data.precision)


class ShiftTerms(NamedTuple):
    """Each patient's log-likelihood as a quadratic in the cohort shift u of the
    effects' means (module docstring, cohort step), (P,) arrays: ``loadings``
    z_m = C⁻¹LᵀP e_bm (M lists of D), ``curvature`` J_i[m, n] keyed (m, n),
    m ≥ n, ``slope`` the M entries of k_i."""

    loadings: list[list[jax.Array]]
    curvature: dict[tuple[int, int], jax.Array]
    slope: list[jax.Array]


def shift_terms(theta: JointHyper, terms: BlockTerms) -> ShiftTerms:
    """J_i = Eᵀ(P − P L K⁻¹ Lᵀ P)E and k_i = Eᵀ(h_μ − P L K⁻¹ Lᵀ h_μ) from the
    patient step's C and C⁻¹Lᵀh_μ, unrolled over (P,) arrays."""
    chol = theta.covariance_chol
    dim = len(terms.factor)
    loadings = []
    for m, block in enumerate(terms.precision):
        a, b = 2 * m, 2 * m + 1  # P e_b has P[a, b] = block.b and P[b, b] = block.d
        column = [  # (LᵀP e_b)_j = L[a, j] P[a, b] + L[b, j] P[b, b], L lower triangular
            (chol[a, j] * block.b if j <= a else 0.0) + chol[b, j] * block.d
            if j <= b
            else jnp.zeros_like(block.d)
            for j in range(dim)
        ]
        loadings.append(_forward_solve(terms.factor, column))
    curvature = {}
    for m, z_m in enumerate(loadings):
        for n in range(m + 1):
            inner = sum(z_m[j] * loadings[n][j] for j in range(dim))
            curvature[m, n] = (terms.precision[m].d if m == n else 0.0) - inner
    slope = [
        terms.h_mu[2 * m + 1] - sum(z_m[j] * terms.whitened[j] for j in range(dim))
        for m, z_m in enumerate(loadings)
    ]
    return ShiftTerms(loadings, curvature, slope)


class CohortStep(NamedTuple):
    """The cohort step given θ: ``value`` Σ_g ½‖F_g⁻¹TK_g‖² − log|F_g|; u_g's
    posterior ``mean`` (G, M) and ``cov`` (G, M, M)."""

    value: jax.Array
    mean: jax.Array
    cov: jax.Array


def cohort_step(
    tau_cohort: jax.Array, shift: ShiftTerms, cohort: jax.Array, num_cohorts: int
) -> CohortStep:
    """Integrate out every cohort's u_g ~ N(0, T²) exactly (module docstring):
    per-cohort sums J_g, K_g by segment_sum, then B_g = I + T J_g T's Cholesky
    factor F_g unrolled over (G,) arrays."""
    count = len(shift.slope)
    total_curvature = {
        key: jax.ops.segment_sum(value, cohort, num_segments=num_cohorts)
        for key, value in shift.curvature.items()
    }
    total_slope = [
        jax.ops.segment_sum(value, cohort, num_segments=num_cohorts) for value in shift.slope
    ]
    scale = tau_cohort

    def entry(i: int, j: int) -> jax.Array:  # B_g[i, j], i ≥ j
        return float(i == j) + scale[i] * total_curvature[i, j] * scale[j]

    factor = _cholesky_rows(entry, count)
    scaled_slope = [scale[m] * total_slope[m] for m in range(count)]
    whitened = _forward_solve(factor, scaled_slope)  # F⁻¹ T K
    value = jnp.sum(
        0.5 * sum(part**2 for part in whitened) - sum(jnp.log(factor[m][m]) for m in range(count))
    )
    inverse = _lower_inverse(factor)  # (G, M, M) F⁻¹
    cov = scale[:, None] * jnp.einsum("gkm,gkn->gmn", inverse, inverse) * scale[None, :]
    mean = jnp.einsum("gmn,gn->gm", cov, jnp.stack(total_slope, -1))
    return CohortStep(value, mean, cov)


def _cohort_index(cohort: jax.Array | None, gram: jax.Array) -> jax.Array:
    """Every patient in cohort 0 when no index is given."""
    return jnp.zeros(gram.shape[0], dtype=jnp.int32) if cohort is None else cohort


def joint_loglik(
    theta: JointHyper,
    gram: jax.Array,
    config: JointConfig,
    cohort: jax.Array | None = None,
    num_cohorts: int = 1,
) -> jax.Array:
    """log p(all measures' evidence | θ), every patient block (and with a cohort
    level every cohort's u_g) integrated out. cohort: (P,) index in
    [0, num_cohorts) (None: one cohort)."""
    terms = block_terms(theta, gram, config)
    total = sum_over_patients(terms.value)
    if not config.cohort_level:
        return total
    shift = shift_terms(theta, terms)
    step = cohort_step(theta.tau_cohort, shift, _cohort_index(cohort, gram), num_cohorts)
    return total + step.value


def _lower_inverse(rows: list[list[jax.Array]]) -> jax.Array:
    """C⁻¹ as a (P, D, D) array, C lower triangular given by rows."""
    dim = len(rows)
    columns = []
    for j in range(dim):
        unit = [jnp.full_like(rows[0][0], float(i == j)) for i in range(dim)]
        columns.append(jnp.stack(_forward_solve(rows, unit), -1))
    return jnp.stack(columns, -1)


def block_posterior(
    theta: JointHyper,
    gram: jax.Array,
    config: JointConfig,
    cohort: jax.Array | None = None,
    num_cohorts: int = 1,
    shift: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Exact posterior of every patient block given θ and all evidence: mean
    (P, D) and covariance (P, D, D), μ + L K⁻¹ Lᵀ h_μ and L K⁻¹ Lᵀ with
    K⁻¹ = C⁻ᵀC⁻¹; with a cohort level mixed over u_g's posterior N(m_g, V_g)
    (module docstring: + A_i m_g and + A_i V_g A_iᵀ). ``shift``: each
    patient's (m_g, V_g), (P, M) and (P, M, M), from all evidence
    (cohort_posterior); None: computed from the patients passed, so pass all
    of their cohorts' patients."""
    terms = block_terms(theta, gram, config)
    chol = theta.covariance_chol
    inverse = _lower_inverse(terms.factor)  # C⁻¹
    whitened = jnp.stack(terms.whitened, -1)
    half = jnp.einsum("ab,pcb->pac", chol, inverse)  # L C⁻ᵀ
    mean = theta.mu.reshape(-1) + jnp.einsum("pac,pc->pa", half, whitened)
    cov = jnp.einsum("pac,pbc->pab", half, half)
    if not config.cohort_level:
        return mean, cov
    quadratic = shift_terms(theta, terms)
    if shift is None:
        cohort = _cohort_index(cohort, gram)
        step = cohort_step(theta.tau_cohort, quadratic, cohort, num_cohorts)
        shift = (step.mean[cohort], step.cov[cohort])
    loadings = jnp.stack([jnp.stack(z_m, -1) for z_m in quadratic.loadings], -1)  # (P, D, M)
    count = config.num_measures
    selection = jnp.zeros((config.block_dim, count), dtype=mean.dtype)
    selection = selection.at[2 * jnp.arange(count) + EFFECT, jnp.arange(count)].set(1.0)
    gain = selection - jnp.einsum("pac,pcm->pam", half, loadings)  # A_i
    mean = mean + jnp.einsum("pam,pm->pa", gain, shift[0])
    cov = cov + jnp.einsum("pam,pmn,pbn->pab", gain, shift[1], gain)
    return mean, cov


def cohort_posterior(
    theta: JointHyper,
    gram: jax.Array,
    config: JointConfig,
    cohort: jax.Array | None = None,
    num_cohorts: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """Posterior of every cohort's u_g given θ and all evidence (the cohort
    step): mean (G, M) and covariance (G, M, M); an empty cohort keeps its
    prior N(0, T²)."""
    terms = block_terms(theta, gram, config)
    step = cohort_step(
        theta.tau_cohort, shift_terms(theta, terms), _cohort_index(cohort, gram), num_cohorts
    )
    return step.mean, step.cov


@partial(jax.jit, static_argnames=("config", "num_cohorts"))
def cohort_posteriors(
    draws: JointHyper, gram: jax.Array, cohort: jax.Array, num_cohorts: int, config: JointConfig
) -> tuple[jax.Array, jax.Array]:
    """cohort_posterior for each of S draws of θ: (S, G, M) and (S, G, M, M)."""
    return jax.lax.map(
        lambda theta: cohort_posterior(theta, gram, config, cohort, num_cohorts), draws
    )


def joint_model(
    gram: jax.Array,
    cohort: jax.Array,
    num_cohorts: int,
    config: JointConfig,
    covariates: jax.Array | None = None,
    groups: jax.Array | None = None,
    num_groups: tuple[int, ...] = (),
) -> None:
    """numpyro model over θ alone (hyper_model's signature, for PopulationFitter):
    priors (PriorConfig, per measure as a single measure's) and the collapsed
    likelihood. cohort: (P,) index in [0, num_cohorts), used with a cohort
    level; the covariate and group arguments are unused (no such levels)."""
    del covariates, groups, num_groups
    priors, count, dim = config.priors, config.num_measures, config.block_dim
    mu = numpyro.sample(
        "mu", dist.Normal(0.0, priors.population_mean_sd).expand([count, 2]).to_event(2)
    )
    tau = numpyro.sample("tau", dist.HalfNormal(priors.patient_scale).expand([dim]).to_event(1))
    corr_chol = _correlation_priors(config)
    sigma = numpyro.sample(
        "sigma", dist.HalfNormal(priors.residual_scale).expand([count]).to_event(1)
    )
    if config.fixed_dim:
        gamma = numpyro.sample(
            "gamma",
            dist.Normal(0.0, priors.trend_sd).expand([count, config.fixed_dim]).to_event(2),
        )
    else:
        gamma = jnp.zeros((count, 0))
    tau_cohort = _cohort_prior(config)
    theta = JointHyper(mu, tau, corr_chol, sigma, gamma, tau_cohort)
    numpyro.factor("collapsed_loglik", joint_loglik(theta, gram, config, cohort, num_cohorts))


def _cohort_prior(config: JointConfig) -> jax.Array:
    """τ_u ~ HalfNormal(priors.cohort_scale) per measure (site "tau_cohort"),
    zeros without a cohort level."""
    count = config.num_measures
    if not config.cohort_level:
        return jnp.zeros(count)
    return numpyro.sample(
        "tau_cohort", dist.HalfNormal(config.priors.cohort_scale).expand([count]).to_event(1)
    )


def joint_from_sites(sites: dict[str, jax.Array], config: JointConfig) -> JointHyper:
    """JointHyper from numpyro sample sites (constrained), any leading draw axes."""
    batch = sites["mu"].shape[:-2]
    gamma = sites["gamma"] if config.fixed_dim else jnp.zeros((*batch, config.num_measures, 0))
    corr_chol = interleave_chol(sites["L_intercepts"], sites["L_effects"])
    tau_cohort = (
        sites["tau_cohort"]
        if config.cohort_level
        else jnp.zeros((*batch, config.num_measures), dtype=sites["tau"].dtype)
    )
    return JointHyper(sites["mu"], sites["tau"], corr_chol, sites["sigma"], gamma, tau_cohort)


def initial_values(config: JointConfig) -> dict[str, np.ndarray]:
    """The single-measure fit's starting point (model.population), per measure."""
    count = config.num_measures
    values = {
        "mu": np.zeros((count, 2)),
        "tau": np.tile([0.5, 0.3], count),
        "L_intercepts": np.eye(count),
        "L_effects": np.eye(count),
        "sigma": np.full(count, 0.5),
    }
    if config.fixed_dim:
        values["gamma"] = np.zeros((count, config.fixed_dim))
    if config.cohort_level:
        values["tau_cohort"] = np.full(count, 0.1)
    return values


def joint_fitter(config: JointConfig, svi_config: SVIConfig | None = None) -> PopulationFitter:
    """model.population's fitter on the joint model (its config's structure)."""
    structure = config.structure
    return PopulationFitter(
        structure,  # type: ignore[arg-type]  # a JointConfig: see PopulationFitter
        svi_config,
        model=joint_model,
        initial_values=initial_values(structure),
        from_sites=joint_from_sites,
    )


def pad_joint(gram: np.ndarray, cohort: np.ndarray | None = None, num_cohorts: int = 1) -> Evidence:
    """Stacked Gram matrices (P, M, d, d) padded to a power-of-two patient count
    (zero blocks add exactly nothing), as the fitter's Evidence; cohort (P,)
    index in [0, num_cohorts) (None: one cohort), the cohort count padded to a
    power of two as well (an empty cohort adds nothing)."""
    count = gram.shape[0]
    padded = np.zeros((bucket_size(count, MIN_PATIENT_BUCKET), *gram.shape[1:]))
    padded[:count] = gram
    padded_cohort = np.zeros(padded.shape[0], dtype=np.int32)
    if cohort is not None:
        cohort = np.asarray(cohort, dtype=np.int32)
        if cohort.shape != (count,):
            raise ValueError(f"cohort must have shape ({count},), got {cohort.shape}")
        if count and (cohort.min() < 0 or cohort.max() >= num_cohorts):
            raise ValueError(f"cohort indices must lie in [0, {num_cohorts})")
        padded_cohort[:count] = cohort
    return Evidence(
        jax.device_put(padded),
        jax.device_put(padded_cohort),
        count,
        bucket_size(num_cohorts, MIN_COHORT_BUCKET),
    )


def fit_joint(
    gram: np.ndarray,
    config: JointConfig,
    svi_config: SVIConfig | None = None,
    seed: int = 0,
    num_draws: int | None = None,
    cohort: np.ndarray | None = None,
    num_cohorts: int = 1,
) -> tuple[JointHyper, UpdateInfo, PopulationFitter, FitState]:
    """A fresh fit of q(θ) to stacked standardised Gram matrices (P, M, d, d)
    (and the patients' cohorts, as pad_joint); returns draws of θ from q
    (leading draw axis), the fit's diagnostics, and the fitter and its state
    for warm updates."""
    fitter = joint_fitter(config, svi_config)
    evidence = pad_joint(np.asarray(gram, dtype=float), cohort, num_cohorts)
    key_init, key_fit, key_draws = jax.random.split(jax.random.PRNGKey(seed), 3)
    state = fitter.init(key_init, evidence)
    state, info = fitter.update(state, evidence, key_fit)
    return fitter.draws(state, key_draws, num_draws), info, fitter, state


class JointPatients(NamedTuple):
    """Every patient's posterior mixed over the draws of θ, standardised units.

    effect_mean, effect_sd: (P, M) mixture mean and sd of each effect b_im;
    effect_lower, effect_upper: (P, M) its 5% and 95% quantiles;
    responsiveness_mean, _sd, _lower, _upper: (P,) the same of ρ_i;
    p_above_population: (P,) P(ρ_i > 0);
    p_benefit_ge_mcid, p_benefit_gt_0: (P, M) P(s_m b_im ≥ t_m) and
    P(s_m b_im > 0), the benefit (effect signed by s_m) against each measure's
    threshold t_m (its MCID, standardised): the mixture over the draws of
    Φ((s_m E[b_im] − t)/sd[b_im]) given θ.
    """

    effect_mean: np.ndarray
    effect_sd: np.ndarray
    effect_lower: np.ndarray
    effect_upper: np.ndarray
    responsiveness_mean: np.ndarray
    responsiveness_sd: np.ndarray
    responsiveness_lower: np.ndarray
    responsiveness_upper: np.ndarray
    p_above_population: np.ndarray
    p_benefit_ge_mcid: np.ndarray
    p_benefit_gt_0: np.ndarray


@partial(jax.jit, static_argnames=("config", "num_cohorts"))
def _mixture_components(
    draws: JointHyper,
    gram: jax.Array,
    signs: jax.Array,
    cohort: jax.Array,
    shifts: tuple[jax.Array, jax.Array] | None,
    num_cohorts: int,
    config: JointConfig,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Per draw: effect means and variances (S, P, M), responsiveness mean and
    variance (S, P). shifts: per draw each patient's cohort posterior, (S, P, M)
    and (S, P, M, M), or None (from the patients passed)."""

    def one(args):
        theta, shift = args
        mean, cov = block_posterior(theta, gram, config, cohort, num_cohorts, shift)
        effects = mean[:, EFFECT::2]
        variances = jnp.diagonal(cov, axis1=-2, axis2=-1)[:, EFFECT::2]
        weight = signs / (config.num_measures * theta.tau[EFFECT::2])
        weights = jnp.zeros(config.block_dim, dtype=mean.dtype).at[EFFECT::2].set(weight)
        rho_mean = (mean - theta.mu.reshape(-1)) @ weights
        rho_var = jnp.einsum("a,pab,b->p", weights, cov, weights)
        return effects, variances, rho_mean, rho_var

    return jax.lax.map(one, (draws, shifts))


_quantiles = jax.jit(mixture_quantiles)


def joint_patients(
    draws: JointHyper,
    gram: np.ndarray,
    config: JointConfig,
    signs: np.ndarray | None = None,
    thresholds: np.ndarray | None = None,
    cohort: np.ndarray | None = None,
    num_cohorts: int = 1,
    cohort_moments: tuple[np.ndarray, np.ndarray] | None = None,
) -> JointPatients:
    """Summaries of every patient's effects and responsiveness from all evidence
    (gram (P, M, d, d), standardised) over S draws of θ. signs: (M,) benefit sign
    of each measure (+1 higher is better; default all +1); thresholds: (M,) each
    measure's MCID in standardised effect units (default 0). With a cohort
    level, cohort (P,) in [0, num_cohorts) (None: one cohort), and
    ``cohort_moments`` each draw's posterior of every cohort's u_g from all
    evidence, (S, G, M) and (S, G, M, M) (cohort_posteriors); None: computed
    from the patients passed, so then pass every patient of their cohorts."""
    signs = np.ones(config.num_measures) if signs is None else np.asarray(signs, dtype=float)
    thresholds = (
        np.zeros(config.num_measures) if thresholds is None else np.asarray(thresholds, float)
    )
    if config.cohort_level and draws.tau_cohort is None:
        raise ValueError("a joint model with a cohort level needs draws of tau_cohort")
    index = np.zeros(np.shape(gram)[0], dtype=np.int32) if cohort is None else cohort
    shifts = None
    if config.cohort_level and cohort_moments is not None:
        shifts = tuple(jnp.asarray(np.asarray(part)[:, index]) for part in cohort_moments)
    effects, variances, rho_mean, rho_var = (
        np.asarray(part)
        for part in _mixture_components(
            draws,
            jax.device_put(np.asarray(gram, dtype=float)),
            jnp.asarray(signs),
            jax.device_put(np.asarray(index, dtype=np.int32)),
            shifts,
            num_cohorts=int(num_cohorts),
            config=config.structure,
        )
    )
    probs = jnp.asarray(INTERVAL_PROBS)

    def summary(means: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, ...]:
        var = np.maximum(var, 1e-24)
        mean = means.mean(axis=0)
        sd = np.sqrt(np.mean(var + (means - mean) ** 2, axis=0))
        q = np.asarray(_quantiles(jnp.asarray(means), jnp.asarray(np.sqrt(var)), probs))
        return mean, sd, q[0], q[1]

    per_measure = [summary(effects[..., m], variances[..., m]) for m in range(config.num_measures)]
    stacked = [np.stack([part[k] for part in per_measure], -1) for k in range(4)]
    rho = summary(rho_mean, rho_var)
    p_above = np.mean(
        jax.scipy.stats.norm.cdf(rho_mean / np.sqrt(np.maximum(rho_var, 1e-24))), axis=0
    )
    benefit = effects * signs  # (S, P, M)
    effect_sd = np.sqrt(np.maximum(variances, 1e-24))
    p_mcid = np.mean(jax.scipy.stats.norm.cdf((benefit - thresholds) / effect_sd), axis=0)
    p_positive = np.mean(jax.scipy.stats.norm.cdf(benefit / effect_sd), axis=0)
    return JointPatients(
        *stacked, *rho, np.asarray(p_above), np.asarray(p_mcid), np.asarray(p_positive)
    )


def describe_correlation(draws: JointHyper) -> dict[str, Any]:
    """Posterior of the effects' between-measure correlation from draws of θ:
    ``mean``, ``sd``, ``q05``, ``q95`` as (M, M) nested lists."""
    return describe(np.asarray(draws.effect_correlation))


def common_factor(correlation: np.ndarray, signs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The common factor of the patients' benefits, per draw of the effects'
    correlation Ω_b (S, M, M): the principal axis of the benefit-signed
    correlation S Ω_b S (S = diag(signs), s_m = +1 where higher is better).

    With λ₁ its largest eigenvalue and v₁ the unit eigenvector, oriented so that
    Σ_m v₁m ≥ 0, the ``loadings`` (S, M) are √λ₁ v₁: measure m's loading is the
    correlation between its standardised benefit and the factor (the first
    principal component of the M standardised benefits), so loadings near 1 on
    every measure mean one trait carries the benefit on all of them (when
    Σ_m v₁m = 0, as for two anti-correlated benefits, the first measure's
    loading is the positive one). The
    ``variance share`` (S,) λ₁ / M is the part of the standardised benefits'
    between-patient variance the factor explains: 1 when the benefits move as
    one, 1/M when they are uncorrelated (then v₁ is arbitrary, and so the
    loadings' posterior is wide). Derived from the full correlation, not a
    separate factor model."""
    signs = np.asarray(signs, dtype=float)
    signed = np.asarray(correlation) * signs[:, None] * signs[None, :]
    values, vectors = np.linalg.eigh(signed)  # ascending eigenvalues
    leading, largest = vectors[..., -1], np.maximum(values[..., -1], 0.0)
    total = leading.sum(axis=-1)  # 0 for two measures whose benefits anti-correlate
    tied = np.abs(total) < 1e-9
    orient = np.where(np.where(tied, leading[..., 0], total) < 0.0, -1.0, 1.0)
    loadings = leading * orient[..., None] * np.sqrt(largest)[..., None]
    return loadings, largest / signs.size


def describe_common_factor(draws: JointHyper, signs: np.ndarray) -> dict[str, Any]:
    """Posterior of the benefits' common factor (``common_factor``) from draws
    of θ: ``loadings`` and ``variance_share``, each ``mean``, ``sd``, ``q05``,
    ``q95`` (loadings as (M,) lists)."""
    loadings, share = common_factor(np.asarray(draws.effect_correlation), signs)
    return {"loadings": describe(loadings), "variance_share": describe(share)}


def joint_config_for(
    events: list[Events],
    *,
    time_trend: bool = False,
    priors: PriorConfig | None = None,
    cohort_level: bool = False,
) -> JointConfig:
    """The joint model of several measures' events (patients indexed alike),
    each standardised by its own data (model.config.Standardization.from_data)."""
    measures = tuple(
        ModelConfig(
            time_trend=time_trend,
            cohort_level=cohort_level,
            standardization=Standardization.from_data(
                each.outcome, each.exposure, each.time if time_trend else None
            ),
        )
        for each in events
    )
    return JointConfig(measures=measures, priors=priors or PriorConfig())


def joint_grams(events: list[Events], config: JointConfig) -> np.ndarray:
    """Stacked standardised Gram matrices (P, M, d, d) of every measure's events
    (model.evidence.events_stats per measure)."""
    return np.stack(
        [
            events_stats(each, measure).gram
            for each, measure in zip(events, config.measures, strict=True)
        ],
        axis=1,
    )


def joint_cohorts(events: list[Events]) -> tuple[np.ndarray, int]:
    """Every patient's cohort (P,) and the number of cohorts, from the measures'
    events (patients indexed alike: their cohort_of_patient must agree)."""
    cohort = np.asarray(events[0].cohort_of_patient, dtype=np.int32)
    for each in events[1:]:
        if not np.array_equal(each.cohort_of_patient, cohort):
            raise ValueError("the measures' events disagree on the patients' cohorts")
    return cohort, int(cohort.max()) + 1 if cohort.size else 1


def uncollapsed_model(
    measure: jax.Array,
    patient: jax.Array,
    exposure: jax.Array,
    time: jax.Array,
    outcome: jax.Array,
    num_patients: int,
    config: JointConfig,
    cohort: jax.Array | None = None,
    num_cohorts: int = 1,
) -> None:
    """The joint model with every patient block sampled (non-centred), standardised
    readings stacked over measures (measure (n,) its index): the NUTS reference.
    Same priors as ``joint_model``. With a cohort level, every cohort's u_g is
    sampled too (non-centred, u_g = τ_u ⊙ z_g), cohort (P,) each patient's."""
    priors, count, dim = config.priors, config.num_measures, config.block_dim
    mu = numpyro.sample(
        "mu", dist.Normal(0.0, priors.population_mean_sd).expand([count, 2]).to_event(2)
    )
    tau = numpyro.sample("tau", dist.HalfNormal(priors.patient_scale).expand([dim]).to_event(1))
    corr_chol = _correlation_priors(config)
    sigma = numpyro.sample(
        "sigma", dist.HalfNormal(priors.residual_scale).expand([count]).to_event(1)
    )
    gamma = jnp.zeros(count)
    if config.fixed_dim:
        gamma = numpyro.sample(
            "gamma", dist.Normal(0.0, priors.trend_sd).expand([count, 1]).to_event(2)
        )[:, 0]
    with numpyro.plate("patients", num_patients):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([dim]).to_event(1))
    blocks = mu.reshape(-1) + z @ (tau[:, None] * corr_chol).T  # (P, D)
    if config.cohort_level:
        tau_cohort = _cohort_prior(config)
        with numpyro.plate("cohorts", num_cohorts):
            unit = numpyro.sample("u_unit", dist.Normal(0.0, 1.0).expand([count]).to_event(1))
        shift = numpyro.deterministic("cohort_effects", unit * tau_cohort)  # (G, M)
        index = jnp.zeros(num_patients, dtype=jnp.int32) if cohort is None else cohort
        blocks = blocks.at[:, EFFECT::2].add(shift[index])
    numpyro.deterministic("effects", blocks[:, EFFECT::2])
    location = (
        blocks[patient, 2 * measure]
        + blocks[patient, 2 * measure + 1] * exposure
        + gamma[measure] * time
    )
    with numpyro.plate("readings", outcome.shape[0]):
        numpyro.sample("y", dist.Normal(location, sigma[measure]), obs=outcome)


def uncollapsed_data(events: list[Events], config: JointConfig) -> tuple[np.ndarray, ...]:
    """Every measure's standardised readings stacked: (measure, patient,
    exposure, time, outcome), the data of ``uncollapsed_model``."""
    parts = []
    for m, (each, measure) in enumerate(zip(events, config.measures, strict=True)):
        y, x, t = measure.standardization.apply(each.outcome, each.exposure, each.time)
        parts.append((np.full(y.size, m), each.patient, x, t, y))
    return tuple(np.concatenate(column) for column in zip(*parts, strict=True))
