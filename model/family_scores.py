"""Scores of Bernoulli and Poisson measures on the scale the catalogue declares.

Given draw θ_s of q(θ), patient i's local effects are Gaussian under the Laplace
step (model.families.local_posterior): r_i | θ_s, y ~ N(m_is, C_is). The posterior
of r_i is the equal-weight mixture over the S draws, as for Gaussian measures
(model.scores); the effect is read on the measure's ``effect_scale``:

- ``log_odds_ratio`` / ``log_rate_ratio``: b_i itself (the link scale); mixture
  of Gaussians, summarised exactly (model.scores.mixture_quantiles).
- ``odds_ratio`` / ``rate_ratio``: exp(b_i), a mixture of log-normals: mean
  (1/S) Σ exp(m + v/2), quantiles exp of b's, P(benefit ≥ MCID) =
  P(sign·b ≥ log MCID), all exact. The MCID is a ratio ≥ 1: "lower is better"
  counts a ratio ≤ 1/MCID as a benefit of at least MCID.
- ``risk_difference`` (Bernoulli) and ``rate_difference`` (Poisson, per unit
  exposure): logit⁻¹(a + b) − logit⁻¹(a), or exp(a + b) − exp(a), for the
  patient's own (a_i, b_i): nonlinear in both, so summarised by Monte Carlo,
  SAMPLES_PER_DRAW draws of r_i from each mixture component (a fixed key: a
  score is a deterministic function of the evidence and the draws). MCID in
  the scale's own units (a probability, or events per unit exposure).

benefit = sign · effect on the link and difference scales (sign = +1 when
higher is better), sign · log(ratio) on the ratio scales. The population effect
is the scale's value at the expected effects (μ_i)_a, (μ_i)_b of the patient's
covariates (a typical patient: group deviations 0), averaged over the draws.
The decomposition into cohort and individual deviations is additive only on the
link scale: elsewhere those fields are NaN.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtr

from model.config import (
    LINK_SCALES,
    RATIO_SCALES,
    MeasureConfig,
    ModelConfig,
    check_scale,
    default_scale,
)
from model.families import (
    LocalPosterior,
    cohort_effect_posterior_laplace,
    local_posterior,
    local_posterior_given_shift,
)
from model.likelihood import Hyper, prior_means
from model.scores import MIXTURE_DTYPE, EffectSummary, mixture_quantiles

SAMPLES_PER_DRAW = 32


@partial(jax.jit, static_argnames=("num_cohorts", "config", "num_groups"))
def local_posteriors(
    draws: Hyper,
    cells: jax.Array,
    cohort: jax.Array,
    num_cohorts: int,
    config: ModelConfig,
    covariates: jax.Array | None = None,
    groups: jax.Array | None = None,
    num_groups: tuple[int, ...] = (),
):
    """model.families.local_posterior under every draw, (S, P) arrays, the draws
    mapped sequentially (memory O(P)); plus (μ_i)_a under every draw."""

    def one(theta: Hyper):
        post = local_posterior(
            theta, cells, cohort, num_cohorts, config, covariates, groups, num_groups
        )
        mean0 = jnp.broadcast_to(prior_means(theta, covariates)[0], post.mean0.shape)
        return post, mean0

    return jax.lax.map(one, draws)


@partial(jax.jit, static_argnames=("num_cohorts", "config"))
def family_cohort_posteriors(
    draws: Hyper,
    cells: jax.Array,
    cohort: jax.Array,
    num_cohorts: int,
    config: ModelConfig,
    covariates: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(mean, variance) of every cohort deviation under every draw, (S, G) each
    (model.families.cohort_effect_posterior_laplace; model.scores.cohort_posteriors
    of a Bernoulli or Poisson measure): what the population agent publishes."""
    return jax.lax.map(
        lambda theta: cohort_effect_posterior_laplace(
            theta, cells, cohort, num_cohorts, config, covariates
        ),
        draws,
    )


@partial(jax.jit, static_argnames=("config",))
def local_posteriors_given_shifts(
    draws: Hyper,
    cells: jax.Array,
    shift_mean: jax.Array,
    shift_var: jax.Array,
    config: ModelConfig,
    covariates: jax.Array | None = None,
):
    """model.families.local_posterior_given_shift under every draw with the
    shifts' moments (S, P) of that draw, and (μ_i)_a: as local_posteriors."""

    def one(args):
        theta, mean, var = args
        post = local_posterior_given_shift(theta, cells, mean, var, config, covariates)
        mean0 = jnp.broadcast_to(prior_means(theta, covariates)[0], post.mean0.shape)
        return post, mean0

    return jax.lax.map(one, (draws, shift_mean, shift_var))


def summarize_family_given_shifts(
    draws: Hyper,
    cells: np.ndarray,
    shift_mean: np.ndarray,
    shift_var: np.ndarray,
    measure: MeasureConfig,
    config: ModelConfig,
    *,
    level: float = 0.9,
    covariates: np.ndarray | None = None,
    seed: int = 0,
) -> EffectSummary:
    """summarize_family_effects of patients whose group shift's posterior under
    each draw is given, (S, P) each (the published cohort posteriors): how the
    streaming worker scores a Bernoulli or Poisson measure's patients, a few at a
    time, as model.scores.summarize_given_cohorts does Gaussian ones."""
    check_scale(config.family, measure.effect_scale or default_scale(config.family), measure.mcid)
    post, mean_a = local_posteriors_given_shifts(
        draws,
        jnp.asarray(cells, dtype=float),
        jnp.asarray(shift_mean, dtype=float),
        jnp.asarray(shift_var, dtype=float),
        config.structure,
        None if covariates is None else jnp.asarray(covariates, dtype=float),
    )
    return _summary(post, mean_a, measure, config.family, level, seed)


def _difference(a: np.ndarray, b: np.ndarray, family: str) -> np.ndarray:
    if family == "bernoulli":
        return jax.nn.sigmoid(a + b) - jax.nn.sigmoid(a)
    return jnp.exp(a + b) - jnp.exp(a)


def summarize_family_effects(
    draws: Hyper,
    cells: np.ndarray,
    cohort: np.ndarray,
    num_cohorts: int,
    measure: MeasureConfig,
    config: ModelConfig,
    *,
    level: float = 0.9,
    covariates: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    num_groups: tuple[int, ...] = (),
    seed: int = 0,
) -> EffectSummary:
    """Every patient's effect on ``measure.effect_scale`` (module docstring):
    mean, sd, central ``level`` interval, P(benefit ≥ MCID), P(benefit > 0)."""
    check_scale(config.family, measure.effect_scale or default_scale(config.family), measure.mcid)
    post, mean_a = local_posteriors(
        draws,
        jnp.asarray(cells, dtype=float),
        jnp.asarray(cohort, dtype=np.int32),
        num_cohorts,
        config.structure,
        None if covariates is None else jnp.asarray(covariates, dtype=float),
        None if groups is None else jnp.asarray(groups, dtype=np.int32),
        tuple(num_groups),
    )
    return _summary(post, mean_a, measure, config.family, level, seed)


def _summary(
    post: LocalPosterior, mean_a: jax.Array, measure: MeasureConfig, family: str, level: float,
    seed: int,
) -> EffectSummary:  # fmt: skip
    """The effect summary on the measure's scale from the patients' local
    posteriors under every draw (S, P) and (μ_i)_a (module docstring)."""
    scale = measure.effect_scale or default_scale(family)
    sign = measure.benefit_sign
    alpha = (1.0 - level) / 2.0
    m, v = np.asarray(post.mean1), np.asarray(post.var1)
    expected_b, expected_a = np.asarray(post.expected), np.asarray(mean_a)
    nan = np.full(m.shape[1], np.nan)
    if scale in RATIO_SCALES or scale in LINK_SCALES:
        sd = np.sqrt(v)
        quantiles = np.asarray(
            mixture_quantiles(
                jnp.asarray(m, MIXTURE_DTYPE),
                jnp.asarray(sd, MIXTURE_DTYPE),
                jnp.asarray([alpha, 1.0 - alpha], MIXTURE_DTYPE),
            ),
            dtype=float,
        )
        threshold = np.log(measure.mcid) if scale in RATIO_SCALES else measure.mcid
        p_mcid = np.mean(ndtr((sign * m - threshold) / sd), axis=0)
        p_zero = np.mean(ndtr(sign * m / sd), axis=0)
        if scale in LINK_SCALES:
            mean = m.mean(axis=0)
            spread = np.sqrt(np.maximum(np.mean(v + m**2, axis=0) - mean**2, 0.0))
            population = expected_b.mean(axis=0)
            cohort_dev = np.asarray(post.shift).mean(axis=0)
            individual = mean - population - cohort_dev
            lower, upper = quantiles
        else:
            mean = np.mean(np.exp(m + v / 2.0), axis=0)
            second = np.mean(np.exp(2.0 * m + 2.0 * v), axis=0)
            spread = np.sqrt(np.maximum(second - mean**2, 0.0))
            population = np.exp(expected_b).mean(axis=0)
            cohort_dev = individual = nan
            lower, upper = np.exp(quantiles)
    else:
        key = jax.random.PRNGKey(seed)
        z = np.asarray(jax.random.normal(key, (2, SAMPLES_PER_DRAW, *m.shape)))
        var0, cov01 = np.asarray(post.var0), np.asarray(post.cov01)
        chol00 = np.sqrt(var0)
        chol10 = cov01 / chol00
        chol11 = np.sqrt(np.maximum(v - chol10**2, 0.0))
        a = np.asarray(post.mean0) + chol00 * z[0]
        b = m + chol10 * z[0] + chol11 * z[1]
        values = np.asarray(_difference(a, b, family)).reshape(-1, m.shape[1])
        benefit = sign * values
        mean = values.mean(axis=0)
        spread = values.std(axis=0)
        lower, upper = np.quantile(values, [alpha, 1.0 - alpha], axis=0)
        p_mcid = np.mean(benefit >= measure.mcid, axis=0)
        p_zero = np.mean(benefit > 0.0, axis=0)
        population = np.asarray(_difference(expected_a, expected_b, family)).mean(axis=0)
        cohort_dev = individual = nan
    return EffectSummary(
        mean=mean,
        sd=spread,
        lower=lower,
        upper=upper,
        p_benefit_ge_mcid=p_mcid,
        p_benefit_gt_0=p_zero,
        population_effect=population,
        cohort_deviation=cohort_dev,
        individual_deviation=individual,
        shrinkage=np.asarray(post.shrinkage).mean(axis=0),
    )


def population_effect_on_scale(draws: Hyper, scale: str, family: str) -> np.ndarray:
    """The population effect under every draw on the scale: μ_b (link), exp(μ_b)
    (ratio), or the difference at (μ_a, μ_b), for a patient with covariates 0."""
    mu = np.asarray(draws.mu)
    if scale in LINK_SCALES:
        return mu[:, 1]
    if scale in RATIO_SCALES:
        return np.exp(mu[:, 1])
    return np.asarray(_difference(mu[:, 0], mu[:, 1], family))
