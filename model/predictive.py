"""Posterior predictive of a patient's next reading, and its standardised residual.

Given θ, the patient's evidence G_i (model.evidence) and the posterior
N(m_g, v_g) of its cohort's effect deviation, the local effects are Gaussian
(model.likelihood.patient_effects_given_theta):

    r_i | θ, data ~ N(ρ, V),   ρ = M⁻¹h + M⁻¹S(μ + e_b m_g),
                               V = M⁻¹ + v_g ℓℓᵀ,   ℓ = M⁻¹S e_b

so a new reading at local design w = (1, x) and fixed design z has, under draw s,

    y | θ_s, data ~ N(wᵀρ_s + zᵀγ_s,  wᵀV_s w + σ_s²).

Over the population posterior's draws the predictive is the equal-weight
mixture of these. The standardised residual is its probability integral
transform mapped to the normal scale,

    z = Φ⁻¹( (1/S) Σ_s Φ((y − mean_s) / sd_s) ),

exactly N(0, 1) when the reading comes from the model (the PIT of a continuous
predictive is uniform), and it needs no moment matching of the mixture.
The prior-data conflict detector (monitoring.drift) runs a CUSUM over z.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtr, ndtri

from model.config import ModelConfig
from model.likelihood import Hyper, patient_terms
from model.population import SMALL_BUCKET, bucket_size

#: Readings per call of the jitted residuals: a step of thousands of readings
#: under 400 draws would hold gigabytes of (S, B, d, d) intermediates.
RESIDUAL_BLOCK = 1024
PIT_CLIP = 1e-12  # keeps Φ⁻¹ finite for readings far in a tail (|z| ≤ 7)


@partial(jax.jit, static_argnames=("config",))
def _residuals(
    draws: Hyper,
    gram: jax.Array,
    shift_mean: jax.Array,
    shift_var: jax.Array,
    columns: jax.Array,
    exposure: jax.Array,
    fixed: jax.Array,
    outcome: jax.Array,
    config: ModelConfig,
    covariates: jax.Array | None = None,
) -> jax.Array:
    """Standardised residuals of a block of readings (standardised units).

    gram: (B, d, d) each reading's patient evidence; shift_mean, shift_var:
    (S, K) a table of group-shift moments, columns: (B,) each reading's column
    of it (gathered here, on the device); exposure, outcome: (B,); fixed:
    (B, d_z); covariates: (B, q) standardised patient covariates or None.
    """
    cohort_mean, cohort_var = shift_mean[:, columns], shift_var[:, columns]

    def moments(theta: Hyper, c_mean: jax.Array, c_var: jax.Array):
        terms = patient_terms(theta, gram, config, covariates)
        load0, load1 = terms.m_inv_s.b, terms.m_inv_s.d  # ℓ = M⁻¹S e_b
        rho0 = terms.cond_mean[0] + load0 * c_mean
        rho1 = terms.cond_mean[1] + load1 * c_mean
        mean = rho0 + exposure * rho1 + fixed @ theta.gamma
        m_inv = terms.m_inv
        quad = m_inv.a + exposure * (m_inv.b + m_inv.c) + exposure**2 * m_inv.d
        loading = load0 + exposure * load1
        return mean, quad + c_var * loading**2 + theta.sigma**2

    means, variances = jax.vmap(moments)(draws, cohort_mean, cohort_var)
    pit = jnp.mean(ndtr((outcome[None] - means) / jnp.sqrt(variances)), axis=0)
    return ndtri(jnp.clip(pit, PIT_CLIP, 1.0 - PIT_CLIP))


def predictive_residuals(*args, **kwargs) -> np.ndarray:
    """``dispatch_residuals(...)()``: the residuals, waited for."""
    return dispatch_residuals(*args, **kwargs)()


def dispatch_residuals(
    draws: Hyper,
    gram: np.ndarray,
    cohort_mean: np.ndarray,
    cohort_var: np.ndarray,
    exposure: np.ndarray,
    time: np.ndarray,
    outcome: np.ndarray,
    config: ModelConfig,
    covariates: np.ndarray | None = None,
    time_covariates: np.ndarray | None = None,
    columns: np.ndarray | None = None,
) -> Callable[[], np.ndarray]:
    """z of each reading (raw exposure, time and outcome, shape (R,)) under the
    mixture predictive given its patient's evidence *before* the reading, as
    dispatched to the device: the returned function waits for it (the caller
    goes on meanwhile; on the host, so no shape of the result is compiled).

    gram: (R, d, d) standardised evidence of each reading's patient, weighted as
    of the reading's time (model.evidence.decay_to); cohort_mean, cohort_var:
    (S, R) as for model.scores.summarize_given_cohorts, or, with ``columns``
    (R,), an (S, K) table of which reading r takes column ``columns[r]``
    (streams.scoring.MeasurePosterior.shift_table: no (S, R) array built per
    batch); covariates: (R, q) standardised covariates of each reading's
    patient, or None; time_covariates: (R, k) the readings' time-varying
    covariates, natural units. Readings are padded to a bucket size, so
    repeated calls compile once per bucket (and table width).
    """
    count = int(np.shape(outcome)[0])
    if count == 0:
        return lambda: np.zeros(0)
    if count > RESIDUAL_BLOCK:  # blocks: memory (S × B × d² per intermediate) and compiles

        def cut(array, start: int, axis: int = 0):
            """``array``'s readings start … start + RESIDUAL_BLOCK along ``axis``."""
            if array is None:
                return None
            return np.asarray(array)[
                (slice(None),) * axis + (slice(start, start + RESIDUAL_BLOCK),)
            ]

        per_reading = columns is None  # the moments have a column per reading, else a table
        blocks = [
            dispatch_residuals(
                draws,
                cut(gram, start),
                cut(cohort_mean, start, axis=1) if per_reading else cohort_mean,
                cut(cohort_var, start, axis=1) if per_reading else cohort_var,
                cut(exposure, start),
                cut(time, start),
                cut(outcome, start),
                config,
                cut(covariates, start),
                cut(time_covariates, start),
                cut(columns, start),
            )
            for start in range(0, count, RESIDUAL_BLOCK)
        ]
        return lambda: np.concatenate([block() for block in blocks])
    y, x, t = config.standardization.apply(
        np.asarray(outcome, dtype=float),
        np.asarray(exposure, dtype=float),
        np.asarray(time, dtype=float),
    )
    parts = [t[:, None]] if config.time_trend else []
    if config.time_covariates:
        parts.append(config.standardization.time_covariates(time_covariates))
    fixed = np.concatenate(parts, axis=-1) if parts else np.zeros((count, 0))
    size = bucket_size(count, SMALL_BUCKET)
    pad = size - count

    def padded(array: np.ndarray, axis: int = 0) -> jax.Array:
        widths = [(0, 0)] * np.ndim(array)
        widths[axis] = (0, pad)
        return jnp.asarray(np.pad(np.asarray(array, dtype=float), widths))

    if columns is None:  # one column per reading
        cohort_mean, cohort_var = padded(cohort_mean, axis=1), padded(cohort_var, axis=1)
        columns = np.arange(size)
    else:  # the table's width padded too: one compile per bucket of it
        columns = np.pad(np.asarray(columns, dtype=np.int32), (0, pad))
        width = np.shape(cohort_mean)[1]
        extra = [(0, 0), (0, bucket_size(width, SMALL_BUCKET) - width)]
        cohort_mean = np.pad(np.asarray(cohort_mean, dtype=float), extra)
        cohort_var = np.pad(np.asarray(cohort_var, dtype=float), extra, constant_values=1.0)
    z = _residuals(
        draws,
        padded(gram),
        jnp.asarray(cohort_mean, dtype=float),
        jnp.asarray(cohort_var, dtype=float),
        jnp.asarray(columns, dtype=np.int32),
        padded(x),
        padded(fixed),
        padded(y),
        config.structure,
        None if covariates is None else padded(covariates),
    )
    return lambda: np.asarray(z)[:count]
