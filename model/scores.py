"""Patient posteriors as Gaussian mixtures over fixed draws of θ, their exact
summaries, and the decision rule.

p(b_i | data) = (1/S) Σ_s N(b_i; m_is, v_is) with θ_s ~ q(θ) fixed per population
version. From the mixture, exactly (up to root-finding tolerance for quantiles):

    mean = (1/S) Σ m_s,   var = (1/S) Σ (v_s + m_s²) − mean²
    P(benefit ≥ MCID) = (1/S) Σ Φ((sign·m_s − MCID)/√v_s)
    F(q) = (1/S) Σ Φ((q − m_s)/√v_s) = α  (central interval by safeguarded Newton)

where sign = +1 when higher is better, −1 when lower is better.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtr, ndtri

from model.config import DecisionRule, MeasureConfig, ModelConfig
from model.exported import ExportCache, through
from model.likelihood import (
    Hyper,
    cohort_effect_posterior,
    group_effect_posterior,
    patient_effects_given_theta,
    patient_shift_posterior,
)
from model.population import SMALL_BUCKET, bucket_size

PATIENT_BLOCK = 4096
#: Quantiles are exact to this fraction of the mixture's smallest component sd
#: (mixture_quantiles): four orders below the Monte Carlo error of a mixture
#: over a few hundred draws of θ, and at the resolution of float32 anyway.
QUANTILE_TOLERANCE = 1e-6
QUANTILE_MAX_STEPS = 100  # bisection alone from the ±12 sd bracket settles in about 25
INV_SQRT_2PI = 0.3989422804014327
DENSITY_SLOPE_BOUND = 0.24197072451914337  # φ(1) = max_z |z φ(z)|
#: Scores evaluate the mixture's CDF (interval ends, probabilities of benefit)
#: in float32: 5-7x faster than float64 on CPU, and its error (< 1e-6 in a
#: probability, in sds for a quantile; tests/test_scores.py) is four orders
#: below the Monte Carlo error of a mixture over a few hundred draws of θ.
MIXTURE_DTYPE = jnp.float32


class Classification(StrEnum):
    RESPONDER = "responder"
    NON_RESPONDER = "non_responder"
    UNCERTAIN = "uncertain"
    INSUFFICIENT_DATA = "insufficient_data"


class EffectSummary(NamedTuple):
    """Per-patient posterior summaries of the exposure effect, raw units, shape (P,).

    population_effect / cohort_deviation / individual_deviation decompose ``mean``
    (mean = population + cohort + individual); ``shrinkage`` in [0, 1] is the
    weight the estimate puts on the pooled prior rather than the patient's data.
    """

    mean: np.ndarray
    sd: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    p_benefit_ge_mcid: np.ndarray
    p_benefit_gt_0: np.ndarray
    population_effect: np.ndarray
    cohort_deviation: np.ndarray
    individual_deviation: np.ndarray
    shrinkage: np.ndarray


def mixture_quantiles(means: jax.Array, sds: jax.Array, probs: jax.Array) -> jax.Array:
    """Quantiles of equal-weight Gaussian mixtures: the root r of
    F(r) = (1/S) Σ_s Φ((r − m_s)/s_s) = p by safeguarded Newton, to within
    ``QUANTILE_TOLERANCE`` times the smallest component sd (or the dtype's
    resolution of r, if coarser).

    Starts from the Cornish-Fisher quantile of the mixture's exact first four
    moments and keeps a bracket [lo, hi] with F(lo) < p ≤ F(hi), initially every
    component's ±12 sd. A Newton step q − (F(q) − p)/f(q) that leaves the
    bracket (or a zero density) is replaced by bisection, so it converges for
    any mixture, multimodal ones included. A quantile is final once the Newton
    point q + δ is proven within the tolerance of r, and that point is taken.
    The proof: Taylor's theorem gives (r − q − δ) f(q) = −½ f'(ξ)(r − q)², and a
    Gaussian mixture's |f'| ≤ D = φ(1) (1/S) Σ_s 1/s_s² everywhere (φ(1) =
    max |z φ(z)|), so e = |r − q − δ| ≤ K (|δ| + e)² with K = D / (2 f(q)),
    hence e ≤ 2 K δ² whenever 4 K |δ| ≤ ½. A Cornish-Fisher start is usually
    close enough for one evaluation of F and f to settle it (a step shorter
    than the tolerance also settles, as does a bracket narrower than it: F
    flat at p between far modes). Settled quantiles are not moved again: near
    the root F(q) − p is rounding noise, and a step on noise can leave the
    bracket and trigger a bisection far from the root.

    means, sds: (S, P) components; probs: (Q,). Returns (Q, P).
    """
    low = jnp.min(means - 12.0 * sds, axis=0)
    high = jnp.max(means + 12.0 * sds, axis=0)
    low = jnp.broadcast_to(low, (probs.size, *low.shape))
    high = jnp.broadcast_to(high, low.shape)
    mean = jnp.mean(means, axis=0)
    centred = means - mean
    var_s = sds**2
    var = jnp.maximum(jnp.mean(var_s + centred**2, axis=0), jnp.finfo(means.dtype).tiny)
    sd = jnp.sqrt(var)
    skew = jnp.mean(centred**3 + 3.0 * centred * var_s, axis=0) / (var * sd)
    kurt = jnp.mean(centred**4 + 6.0 * centred**2 * var_s + 3.0 * var_s**2, axis=0) / var**2 - 3
    z = ndtri(probs)[:, None]
    cornish_fisher = (
        z
        + (z**2 - 1.0) * skew / 6.0
        + (z**3 - 3.0 * z) * kurt / 24.0
        - (2.0 * z**3 - 5.0 * z) * skew**2 / 36.0
    )
    start = jnp.clip(mean + cornish_fisher * sd, low, high)
    resolution = 8.0 * jnp.finfo(means.dtype).eps * (jnp.abs(mean) + sd)  # of q itself
    tolerance = jnp.maximum(QUANTILE_TOLERANCE * jnp.min(sds, axis=0), resolution)
    slope_bound = DENSITY_SLOPE_BOUND * jnp.mean(1.0 / var_s, axis=0)  # D ≥ |f'| everywhere
    target = probs[:, None]

    def step(state):
        lo, hi, q, done, steps = state
        z = (q[:, None, :] - means[None]) / sds[None]
        cdf = jnp.mean(ndtr(z), axis=1)
        density = jnp.mean(jnp.exp(-0.5 * z**2) / sds[None], axis=1) * INV_SQRT_2PI
        below = cdf < target
        lo, hi = jnp.where(below, q, lo), jnp.where(below, hi, q)
        delta = (target - cdf) / density
        newton = q + delta
        inside = (newton >= lo - tolerance) & (newton <= hi + tolerance)  # False for nan, ±inf
        following = jnp.where(inside, newton, 0.5 * (lo + hi))
        k_delta = slope_bound / (2.0 * density) * jnp.abs(delta)  # K |δ|, nan-free where inside
        proven = (k_delta <= 0.125) & (2.0 * k_delta * jnp.abs(delta) <= tolerance)
        short = jnp.abs(delta) <= tolerance
        settled = (inside & (proven | short)) | (hi - lo <= tolerance)
        return lo, hi, jnp.where(done, q, following), done | settled, steps + 1

    def unsettled(state) -> jax.Array:
        *_, done, steps = state
        return ~jnp.all(done) & (steps < QUANTILE_MAX_STEPS)

    # The first step outside the loop: it usually settles every quantile, and
    # XLA fuses it with the start (a loop body is a separate computation).
    state = step((low, high, start, jnp.zeros(start.shape, dtype=bool), 0))
    return jax.lax.while_loop(unsettled, step, state)[2]


def describe(samples: np.ndarray | None) -> Any:
    """mean, sd, 5% and 95% quantiles of posterior samples along their first
    axis (the draws): floats for draws of a scalar, nested lists for draws of an
    array (None passes through)."""
    if samples is None:
        return None
    samples = np.asarray(samples, dtype=float)
    return {
        "mean": samples.mean(axis=0).tolist(),
        "sd": samples.std(axis=0, ddof=1).tolist(),
        "q05": np.quantile(samples, 0.05, axis=0).tolist(),
        "q95": np.quantile(samples, 0.95, axis=0).tolist(),
    }


@partial(jax.jit, static_argnames=("config",))
def _block_summary(
    draws: Hyper,
    gram: jax.Array,
    shift_mean: jax.Array,
    shift_var: jax.Array,
    shift_index: jax.Array,
    mcid_std: jax.Array,
    sign: jax.Array,
    probs: jax.Array,
    config: ModelConfig,
    covariates: jax.Array | None = None,
):
    """Mixture summaries of one block of patients, standardised units.

    shift_mean, shift_var: (S, K) posterior moments of group deviations under
    each draw; shift_index: (B,) the column of each patient's (gathered here, so
    only the small table and the indices cross to the device); covariates:
    (B, q) standardised, or None.
    """
    cohort_mean, cohort_var = shift_mean[:, shift_index], shift_var[:, shift_index]
    comps = jax.vmap(patient_effects_given_theta, in_axes=(0, None, 0, 0, None, None))(
        draws, gram, cohort_mean, cohort_var, config, covariates
    )
    # Materialised once (the barrier): XLA would otherwise fuse, i.e. recompute,
    # the components into each CDF pass below.
    m, v, shrinkage, expected = jax.lax.optimization_barrier(
        (comps.mean, comps.variance, comps.shrinkage, comps.expected)
    )
    mean = jnp.mean(m, axis=0)
    var = jnp.mean(v + m**2, axis=0) - mean**2
    # The mixture's CDF in MIXTURE_DTYPE (see there); moments stay in float64.
    m_low, sd_low = jax.lax.optimization_barrier(
        (m.astype(MIXTURE_DTYPE), jnp.sqrt(v).astype(MIXTURE_DTYPE))
    )
    quantiles = mixture_quantiles(m_low, sd_low, probs.astype(MIXTURE_DTYPE)).astype(m.dtype)
    sign_low = sign.astype(MIXTURE_DTYPE)
    p_mcid = jnp.mean(ndtr((sign_low * m_low - mcid_std.astype(MIXTURE_DTYPE)) / sd_low), axis=0)
    p_zero = jnp.mean(ndtr(sign_low * m_low / sd_low), axis=0)
    population = jnp.mean(expected, axis=0)  # μ_b + (B x_i)_b
    cohort = jnp.mean(comps.cohort_mean, axis=0)
    return (
        mean,
        jnp.sqrt(jnp.maximum(var, 0.0)),
        quantiles,
        p_mcid.astype(m.dtype),
        p_zero.astype(m.dtype),
        population,
        cohort,
        jnp.mean(shrinkage, axis=0),
    )


@partial(jax.jit, static_argnames=("num_cohorts", "config"))
def cohort_posteriors(
    draws: Hyper,
    gram: jax.Array,
    cohort: jax.Array,
    num_cohorts: int,
    config: ModelConfig,
    covariates: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(mean, variance) of every cohort deviation under every draw: (S, G) each.
    Draws are mapped sequentially so memory stays O(P), not O(S·P)."""
    return jax.lax.map(
        lambda theta: cohort_effect_posterior(theta, gram, cohort, num_cohorts, config, covariates),
        draws,
    )


@partial(jax.jit, static_argnames=("num_cohorts", "config", "num_groups"))
def group_posteriors(
    draws: Hyper,
    gram: jax.Array,
    cohort: jax.Array,
    num_cohorts: int,
    config: ModelConfig,
    covariates: jax.Array | None,
    groups: jax.Array,
    num_groups: tuple[int, ...],
) -> tuple[jax.Array, jax.Array]:
    """(mean, variance) of every group effect at every level under every draw,
    (S, G) each, the cohorts first then each further level's groups
    (model.likelihood.group_effect_posterior's marginals)."""

    def one(theta: Hyper) -> tuple[jax.Array, jax.Array]:
        mean, cov = group_effect_posterior(
            theta, gram, cohort, num_cohorts, config, covariates, groups, num_groups
        )
        return mean, jnp.diagonal(cov)

    return jax.lax.map(one, draws)


class LevelPosteriors(NamedTuple):
    """The groups' joint posterior under every draw of θ in the compact form a
    patient's total shift needs, every grouping level l (0 the cohorts, then each
    of ModelConfig.grouping_levels) with G_l groups:

    mean[l], var[l]: (S, G_l) each group's posterior mean and variance;
    cross[k]: (S, G_l, G_m) the covariances between the groups of levels l < m,
    pairs in the order of ``level_pairs``.

    A patient sits in one group per level, so its shift s = Σ_l u_{l, g_l} has
    E[s] = Σ_l mean[l][g_l] and Var[s] = Σ_l var[l][g_l] + 2 Σ_{l<m} cross_lm[g_l, g_m]:
    the covariances *within* a level are never needed and are left out
    (G + Σ_{l<m} G_l G_m numbers per draw instead of G²).
    """

    mean: tuple[np.ndarray, ...]
    var: tuple[np.ndarray, ...]
    cross: tuple[np.ndarray, ...]


def level_pairs(levels: int) -> list[tuple[int, int]]:
    """The pairs (l, m), l < m, of ``levels`` grouping levels in LevelPosteriors order."""
    return [(first, second) for first in range(levels) for second in range(first + 1, levels)]


@partial(jax.jit, static_argnames=("num_cohorts", "config", "num_groups"))
def level_posteriors(
    draws: Hyper,
    gram: jax.Array,
    cohort: jax.Array,
    num_cohorts: int,
    config: ModelConfig,
    covariates: jax.Array | None,
    groups: jax.Array,
    num_groups: tuple[int, ...],
) -> LevelPosteriors:
    """LevelPosteriors of the (padded) groups of every level, from the dense
    joint posterior model.likelihood.group_effect_posterior under each draw
    (mapped sequentially: memory O(G²) per draw, not O(S·G²))."""
    sizes = (num_cohorts, *num_groups)
    starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    blocks = [slice(starts[level], starts[level + 1]) for level in range(len(sizes))]

    def one(theta: Hyper):
        mean, cov = group_effect_posterior(
            theta, gram, cohort, num_cohorts, config, covariates, groups, num_groups
        )
        variance = jnp.diagonal(cov)
        return (
            tuple(mean[block] for block in blocks),
            tuple(variance[block] for block in blocks),
            tuple(cov[blocks[first], blocks[second]] for first, second in level_pairs(len(sizes))),
        )

    return LevelPosteriors(*jax.lax.map(one, draws))


def shift_moments_by_level(
    posteriors: LevelPosteriors, index: np.ndarray, prior_var: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(S, P) mean and variance of each patient's total group shift Σ_l u_{l, g_l(i)}
    under each draw, from the LevelPosteriors (see there). index: (P, L) each
    patient's group at each level, −1 for a group the posterior has not seen:
    such a group is independent of every other a posteriori and keeps its prior
    N(0, τ_l²), prior_var (S, L) = τ_l² under each draw (a group without
    patients in the fit is exactly that: model.likelihood.group_step)."""
    index = np.asarray(index, dtype=np.int64)
    prior_var = np.asarray(prior_var, dtype=float)
    num_draws, num_patients = prior_var.shape[0], index.shape[0]
    seen = index >= 0
    at = np.where(seen, index, 0)
    mean = np.zeros((num_draws, num_patients))
    var = np.zeros((num_draws, num_patients))
    for level in range(index.shape[1]):
        level_mean = np.asarray(posteriors.mean[level], dtype=float)
        level_var = np.asarray(posteriors.var[level], dtype=float)
        known = seen[:, level]
        if level_mean.shape[1] == 0:  # no group seen at this level
            level_mean = level_var = np.zeros((num_draws, 1))
        mean += np.where(known, level_mean[:, at[:, level]], 0.0)
        var += np.where(known, level_var[:, at[:, level]], prior_var[:, level : level + 1])
    for (first, second), block in zip(level_pairs(index.shape[1]), posteriors.cross, strict=True):
        block = np.asarray(block, dtype=float)
        both = seen[:, first] & seen[:, second]
        if block.shape[1] == 0 or block.shape[2] == 0:
            continue
        var += 2.0 * np.where(both, block[:, at[:, first], at[:, second]], 0.0)
    return mean, var


@partial(jax.jit, static_argnames=("num_cohorts", "config", "num_groups"))
def patient_shift_posteriors(
    draws: Hyper,
    gram: jax.Array,
    cohort: jax.Array,
    num_cohorts: int,
    config: ModelConfig,
    covariates: jax.Array | None = None,
    groups: jax.Array | None = None,
    num_groups: tuple[int, ...] = (),
) -> tuple[jax.Array, jax.Array]:
    """(mean, variance) of every patient's total group shift under every draw,
    (S, P) each (model.likelihood.patient_shift_posterior), draws mapped
    sequentially as in cohort_posteriors."""
    return jax.lax.map(
        lambda theta: patient_shift_posterior(
            theta, gram, cohort, num_cohorts, config, covariates, groups, num_groups
        ),
        draws,
    )


def summarize_effects(
    draws: Hyper,
    gram: np.ndarray,
    cohort: np.ndarray,
    num_cohorts: int,
    measure: MeasureConfig,
    config: ModelConfig,
    *,
    level: float = 0.9,
    block: int = PATIENT_BLOCK,
    covariates: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    num_groups: tuple[int, ...] = (),
    export_cache: ExportCache | None = None,
) -> EffectSummary:
    """Posterior summaries of every patient's effect (raw units) from all evidence:
    cohort posteriors from every patient, then each patient's mixture.
    covariates: (P, q) standardised patient covariates when the model has them;
    groups (P, L), num_groups: the further grouping levels' indices and (padded)
    group counts when it has them. With several levels a patient's
    ``cohort_deviation`` is its total group shift (the sum over levels).
    export_cache: where the traced programs are kept across processes (model.exported)."""
    gram = np.asarray(gram)
    cohort = np.asarray(cohort, dtype=np.int32)
    # jax.device_put, not jnp.asarray, of host arrays: the latter compiles a
    # program per shape (each a trace and a cache lookup in every process).
    x = None if covariates is None else jax.device_put(np.asarray(covariates, dtype=float))
    if config.grouping_levels:
        shift_mean, shift_var = (
            np.asarray(moment)
            for moment in through(
                export_cache,
                "scores.patient_shift_posteriors",
                partial(
                    patient_shift_posteriors,
                    num_cohorts=num_cohorts,
                    config=config.structure,
                    num_groups=tuple(num_groups),
                ),
                (num_cohorts, config.structure, tuple(num_groups)),
            )(
                draws,
                jax.device_put(gram),
                jax.device_put(cohort),
                covariates=x,
                groups=jax.device_put(np.asarray(groups, dtype=np.int32)),
            )
        )
        index = None
    else:
        shift_mean, shift_var = through(
            export_cache,
            "scores.cohort_posteriors",
            partial(cohort_posteriors, num_cohorts=num_cohorts, config=config.structure),
            (num_cohorts, config.structure),
        )(draws, jax.device_put(gram), jax.device_put(cohort), covariates=x)
        index = cohort
    return summarize_given_cohorts(
        draws,
        gram,
        shift_mean,
        shift_var,
        measure,
        config,
        shift_index=index,
        level=level,
        block=block,
        covariates=covariates,
        export_cache=export_cache,
    )


def summarize_given_cohorts(*args, **kwargs) -> EffectSummary:
    """``dispatch_given_cohorts(...)()``: the summaries, waited for."""
    return dispatch_given_cohorts(*args, **kwargs)()


def dispatch_given_cohorts(
    draws: Hyper,
    gram: np.ndarray,
    cohort_mean: np.ndarray,
    cohort_var: np.ndarray,
    measure: MeasureConfig,
    config: ModelConfig,
    *,
    shift_index: np.ndarray | None = None,
    level: float = 0.9,
    block: int = PATIENT_BLOCK,
    covariates: np.ndarray | None = None,
    export_cache: ExportCache | None = None,
) -> Callable[[], EffectSummary]:
    """Posterior summaries (raw units) of patients whose cohort-deviation posterior
    under each draw is given: cohort_mean, cohort_var of shape (S, K), patient
    i's in column shift_index[i] ((P,); None: K = P, patient i's is column i);
    covariates: (P, q) standardised patient covariates when the model has them.
    Returned as dispatched to the device: the returned function waits for
    them and finishes them on the host (the caller goes on meanwhile).

    The streaming worker scores its own patients this way with the cohort
    posteriors published by the population agent. Patients are processed in
    fixed-size blocks (padded), so this compiles once per block size and fits in
    memory at 1M patients; pass a small ``block`` to score a few patients.
    """
    gram = np.asarray(gram)
    num_patients = gram.shape[0]
    block = min(block, bucket_size(num_patients, SMALL_BUCKET))
    to_raw = config.standardization.effect_to_raw(1.0)
    mcid_std = jax.device_put(measure.mcid / to_raw)  # as jnp.asarray, without a compile
    sign = jax.device_put(measure.benefit_sign)
    alpha = (1.0 - level) / 2.0
    probs = jax.device_put(np.asarray([alpha, 1.0 - alpha]))
    # units are applied outside: one compile for all measures
    block_summary = through(
        export_cache,
        "scores.block_summary",
        partial(_block_summary, config=config.structure),
        config.structure,
    )
    # A table indexed by patient (shift_index None: K = P) goes to the device a
    # block of columns at a time; a table of groups once per call, its columns
    # padded to a bucket size (one compile per bucket, not per number of groups).
    per_patient = shift_index is None
    if not per_patient:
        columns = np.shape(cohort_mean)[1]
        pad_columns = ((0, 0), (0, bucket_size(max(columns, 1), SMALL_BUCKET) - columns))
        table_mean = jax.device_put(np.pad(np.asarray(cohort_mean, dtype=float), pad_columns))
        table_var = jax.device_put(np.pad(np.asarray(cohort_var, dtype=float), pad_columns))
        shift_index = np.asarray(shift_index, dtype=np.int32)
    parts = []
    for start in range(0, num_patients, block):
        stop = min(start + block, num_patients)
        pad = block - (stop - start)
        g = np.pad(gram[start:stop], ((0, pad), (0, 0), (0, 0)))
        if per_patient:
            table_mean = jax.device_put(np.pad(cohort_mean[:, start:stop], ((0, 0), (0, pad))))
            table_var = jax.device_put(np.pad(cohort_var[:, start:stop], ((0, 0), (0, pad))))
            index = np.arange(block, dtype=np.int32)
        else:
            index = np.pad(shift_index[start:stop], (0, pad))
        x = None
        if covariates is not None:
            x = jax.device_put(
                np.pad(np.asarray(covariates, float)[start:stop], ((0, pad), (0, 0)))
            )
        out = block_summary(
            draws,
            jax.device_put(g),
            table_mean,
            table_var,
            jax.device_put(index),
            mcid_std,
            sign,
            probs,
            covariates=x,
        )
        parts.append((out, stop - start))
    return partial(_finish_summary, parts, to_raw)


def _finish_summary(parts: list, to_raw: float) -> EffectSummary:
    """The summaries of dispatched blocks (each ``(outputs, patients)``), waited
    for, unpadded and joined, in raw units."""
    if not parts:
        empty = np.zeros(0)
        return EffectSummary(*([empty] * len(EffectSummary._fields)))
    mean, sd, quantiles, p_mcid, p_zero, population, cohort_dev, shrinkage = (
        np.concatenate(col, axis=-1)
        for col in zip(
            *([np.asarray(x)[..., :count] for x in out] for out, count in parts), strict=True
        )
    )
    return EffectSummary(
        mean=mean * to_raw,
        sd=sd * to_raw,
        lower=quantiles[0] * to_raw,
        upper=quantiles[1] * to_raw,
        p_benefit_ge_mcid=p_mcid,
        p_benefit_gt_0=p_zero,
        population_effect=population * to_raw,
        cohort_deviation=cohort_dev * to_raw,
        individual_deviation=(mean - population - cohort_dev) * to_raw,
        shrinkage=shrinkage,
    )


def classify(
    p_benefit_ge_mcid: np.ndarray,
    p_benefit_gt_0: np.ndarray,
    count_exposed: np.ndarray,
    count_unexposed: np.ndarray,
    rule: DecisionRule,
    previous: np.ndarray | None = None,
) -> np.ndarray:
    """The design's default rule, vectorised; returns an array of Classification values.

    insufficient data until min_unexposed and min_exposed observations; then
    responder if P(benefit ≥ MCID) ≥ responder_probability, non-responder if
    P(benefit > 0) ≤ nonresponder_probability, otherwise uncertain. With the
    ``previous`` calls, hysteresis: a responder stays one while P(benefit ≥ MCID)
    ≥ responder_leave_probability, a non-responder while P(benefit > 0) ≤
    nonresponder_leave_probability (DecisionRule).
    """
    p_mcid = np.asarray(p_benefit_ge_mcid)
    p_zero = np.asarray(p_benefit_gt_0)
    enough = (np.asarray(count_exposed) >= rule.min_exposed) & (
        np.asarray(count_unexposed) >= rule.min_unexposed
    )
    if previous is None:
        previous = np.full(p_mcid.shape, "", dtype=object)
    previous = np.asarray(previous, dtype=object)
    stays_responder = (previous == Classification.RESPONDER.value) & (
        p_mcid >= rule.responder_leave_probability
    )
    stays_nonresponder = (previous == Classification.NON_RESPONDER.value) & (
        p_zero <= rule.nonresponder_leave_probability
    )
    return np.select(
        [
            ~enough,
            stays_responder,
            stays_nonresponder,
            p_mcid >= rule.responder_probability,
            p_zero <= rule.nonresponder_probability,
        ],
        [
            Classification.INSUFFICIENT_DATA.value,
            Classification.RESPONDER.value,
            Classification.NON_RESPONDER.value,
            Classification.RESPONDER.value,
            Classification.NON_RESPONDER.value,
        ],
        default=Classification.UNCERTAIN.value,
    )
