"""Measures that are not Gaussian: binary (Bernoulli, logit link) and count
(Poisson, log link, optional exposure) outcomes, through a Laplace step per patient.

Model, patient i in cohort g, reading t with exposure x_it ∈ {0, 1}:

    η_it = a_i + b_i x_it  (+ log e_it, Poisson's exposure/offset)
    y_it ~ Bernoulli(logit⁻¹ η_it)   or   y_it ~ Poisson(exp η_it)
    r_i = (a_i, b_i) ~ N(μ_i + e_b s_i, Σ),  s_i the patient's total group shift

with the same hyperparameters, priors and pooling as the Gaussian model
(model.likelihood) minus σ and γ: no residual sd, and no time trend or
time-varying covariates (they would break the cell statistics below).

**Cell statistics.** Both families are exponential families in the linear
predictor: a reading contributes y η − A(η) with A = softplus (Bernoulli) or exp
(Poisson), so a patient's log-likelihood depends on its readings only through
two cells, unexposed (c = 0, η = a) and exposed (c = 1, η = a + b):

    ℓ_i(r) = Σ_c s_c η_c − n_c A(η_c) + k_i

n_c: readings (Bernoulli) or total exposure Σ e_t (Poisson), s_c: successes or
counts, k_i = Σ_t y_t log e_t − log y_t! (Poisson; 0 for Bernoulli), a constant
in θ. Forgetting weights multiply n, s and k (a power likelihood). Five floats per
patient (CELLS), additive and mergeable like the Gaussian Gram matrices.

**Laplace step.** Given θ, each ℓ_i is replaced by its second-order expansion
at r̂_i, the patient's part of the joint posterior mode of (r, u) given θ:

    ℓ_i(r) ≈ ℓ_i(r̂) + g_iᵀ(r − r̂) − ½ (r − r̂)ᵀ P_i (r − r̂),
    g_i = ∇ℓ_i(r̂),  P_i = −∇²ℓ_i(r̂) = [[w_0 + w_1, w_1], [w_1, w_1]],  w_c = n_c A''(η̂_c)

which is a Gaussian pseudo-likelihood in r with precision P_i, information
h_i = P_i r̂ + g_i and constant ℓ_i(r̂) − g_iᵀr̂ − ½ r̂ᵀP_i r̂. It is handed to the
Gaussian collapse unchanged as a pseudo-Gram matrix with σ = 1 (pseudo_gram),
so patients and groups integrate out exactly *for the expanded likelihood*:
expanding every patient at the joint mode makes the result the Laplace
approximation of log p(y | θ) over all patient and group effects jointly (the
approximation of lme4's glmer with nAGQ = 1), Laplace's correction
−½ log|I + LᵀPL| included by the Gaussian patient step.

The joint mode is found by alternating, vectorised over patients (ROUNDS
rounds): each patient's conditional mode given the current group shifts (a
damped 2×2 Newton in closed form, NEWTON_STEPS steps, warm-started), then the
shifts' posterior means under the expanded likelihood (the Gaussian group step),
and a final joint Newton step (expand). Gradients in θ are reverse-mode
autodiff of the Laplace value with the mode's own dependence on θ included
(through that last Newton step: the implicit-function derivative), so the fit
optimises the value computed, Laplace's correction and all.

Patient posteriors given θ are the Gaussian ones of the expanded model
(model.likelihood.patient_effects_given_theta on the pseudo-Gram matrices),
mixed over the draws of θ as for every measure; model.scores_families reads
them on the measure's effect scale.
"""

from __future__ import annotations

import math
import struct
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import gammaln

from model.config import CELLS, ModelConfig
from model.evidence import PatientStats
from model.likelihood import (
    EFFECT,
    Hyper,
    Mat2,
    _collapsed_value,
    cohort_effect_posterior,
    patient_shift_posterior,
    patient_terms,
    prior_means,
)

Family = Literal["gaussian", "bernoulli", "poisson"]
NEWTON_STEPS = 4
ROUNDS = 4
#: Candidate step lengths of the damped Newton step: the best of them is taken
#: (the objective is concave, so the full step is taken once near the mode).
STEP_LENGTHS = (1.0, 0.5, 0.25, 0.0625)
MAX_LINEAR_PREDICTOR = 40.0  # exp(40) counts per unit exposure: far beyond any data


class FamilyError(ValueError):
    """Readings that the family cannot take (the message says which and why)."""


def invalid_outcomes(outcome: np.ndarray, family: Family) -> tuple[np.ndarray, str]:
    """(mask of the outcomes the family cannot take, what it takes): a Bernoulli
    outcome is 0 or 1, a Poisson one a non-negative integer."""
    outcome = np.asarray(outcome, dtype=float)
    if family == "bernoulli":
        return ~np.isin(outcome, (0.0, 1.0)), "0 or 1"
    if family == "poisson":
        return ~((outcome >= 0) & (outcome == np.round(outcome))), "a non-negative integer count"
    return np.zeros(outcome.shape, dtype=bool), "any number"


def check_outcomes(outcome: np.ndarray, family: Family) -> None:
    """FamilyError naming the first outcome the family cannot take."""
    bad, what = invalid_outcomes(outcome, family)
    if np.any(bad):
        first = int(np.flatnonzero(bad)[0])
        raise FamilyError(
            f"a {family} outcome must be {what}; reading {first} is "
            f"{np.asarray(outcome, dtype=float)[first]:g} ({int(bad.sum())} such reading(s))"
        )


def check_exposure(exposure: np.ndarray) -> None:
    """The cell statistics need an exposure that is 0 or 1 (no doses)."""
    exposure = np.asarray(exposure, dtype=float)
    bad = ~np.isin(exposure, (0.0, 1.0))
    if np.any(bad):
        first = int(np.flatnonzero(bad)[0])
        raise FamilyError(
            f"binary and count measures need an exposure of 0 or 1; reading {first} has "
            f"{exposure[first]:g} ({int(bad.sum())} such reading(s))"
        )


def cell_stats(
    num_patients: int,
    patient: np.ndarray,
    exposure: np.ndarray,
    outcome: np.ndarray,
    family: Family,
    offset: np.ndarray | None = None,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Every patient's cell statistics (P, CELLS) from its readings.

    offset: (n,) exposure e_t > 0 of each Poisson reading (person-time; default 1),
    None for Bernoulli; weights: (n,) forgetting weights (default 1). Raises
    FamilyError for outcomes, exposures or offsets the family cannot take.
    """
    if family not in ("bernoulli", "poisson"):
        raise FamilyError(f"cell statistics are for bernoulli and poisson, not {family!r}")
    patient = np.asarray(patient, dtype=np.int64)
    outcome = np.asarray(outcome, dtype=float)
    check_outcomes(outcome, family)
    check_exposure(exposure)
    exposed = np.asarray(exposure, dtype=float) == 1.0
    weights = np.ones(outcome.size) if weights is None else np.asarray(weights, dtype=float)
    if offset is not None and family != "poisson":
        raise FamilyError("an exposure offset is for poisson counts only")
    size = np.ones(outcome.size) if offset is None else np.asarray(offset, dtype=float)
    if np.any(~(size > 0)) or not np.all(np.isfinite(size)):
        raise FamilyError("a poisson exposure (offset) must be positive and finite")
    constant = np.zeros(outcome.size)
    if family == "poisson":
        constant = outcome * np.log(size) - np.asarray(gammaln(outcome + 1.0))

    def total(values: np.ndarray, where: np.ndarray) -> np.ndarray:
        return np.bincount(
            patient[where], weights=(weights * values)[where], minlength=num_patients
        )

    every = np.ones(outcome.size, dtype=bool)
    return np.stack(
        [
            total(size, ~exposed),
            total(outcome, ~exposed),
            total(size, exposed),
            total(outcome, exposed),
            total(constant, every),
        ],
        axis=-1,
    )


def add_cell_reading(
    cells: bytes,
    reference_time: float,
    exposure: float,
    time: float,
    outcome: float,
    family: Family,
    half_life: float | None = None,
    offset: float = 1.0,
) -> tuple[bytes, float]:
    """One patient's cell statistics plus one reading, in plain Python floats
    (the stream's one-reading-at-a-time step, as model.evidence.add_reading for
    Gram matrices). ``cells``: the CELLS floats at ``reference_time`` (−inf: no
    readings), ``packed`` (model.evidence); returns the new (cells,
    reference_time), packed. With forgetting, weights are relative to the later
    reference time, so the result equals cell_stats of all readings with weights
    2^(−(T − t)/half_life) (model.evidence.decay_to re-bases cell statistics like
    Gram matrices). FamilyError for a value the
    family cannot take."""
    check_outcomes(np.asarray([outcome]), family)
    check_exposure(np.asarray([exposure]))
    if family == "bernoulli" and offset != 1.0:
        raise FamilyError("an exposure offset is for poisson counts only")
    if not offset > 0 or not math.isfinite(offset):
        raise FamilyError("a poisson exposure (offset) must be positive and finite")
    reference = max(reference_time, time)
    old = new = 1.0
    if half_life is not None:
        if reference_time > -math.inf:
            old = 2.0 ** (-(reference - reference_time) / half_life)
        new = 2.0 ** (-(reference - time) / half_life)
    constant = 0.0
    if family == "poisson":
        constant = outcome * math.log(offset) - math.lgamma(outcome + 1.0)
    if len(cells) != _CELL_LAYOUT.size:
        raise ValueError(f"cell statistics of {len(cells)} bytes, not {CELLS} float64 values")
    updated = [value * old for value in _CELL_LAYOUT.unpack(cells)]
    cell = 2 if exposure == 1.0 else 0
    updated[cell] += new * offset
    updated[cell + 1] += new * outcome
    updated[4] += new * constant
    return _CELL_LAYOUT.pack(*updated), reference


_CELL_LAYOUT = struct.Struct(f"<{CELLS}d")  # model.evidence.packed cell statistics


def family_stats_from_events(
    num_patients: int,
    patient: np.ndarray,
    exposure: np.ndarray,
    time: np.ndarray,
    outcome: np.ndarray,
    config: ModelConfig,
) -> PatientStats:
    """Batch computation of every patient's cell statistics as PatientStats
    (``gram`` (P, CELLS)), the family's model.evidence.stats_from_events: each
    patient's reference time is its latest reading, weights are
    2^(−(T − t)/half_life) (config.half_life), and a reading counts as exposed
    when its exposure is not 0 (a dose or a partial adherence is exposure: the
    cells are binary). FamilyError for outcomes the family cannot take."""
    patient = np.asarray(patient, dtype=np.int64)
    time = np.asarray(time, dtype=float)
    exposed = np.asarray(exposure, dtype=float) != 0.0
    reference = np.full(num_patients, -np.inf)
    np.maximum.at(reference, patient, time)
    weights = None
    if config.half_life is not None:
        weights = np.exp2(-(reference[patient] - time) / config.half_life)
    cells = cell_stats(
        num_patients, patient, exposed.astype(float), outcome, config.family, weights=weights
    )
    return PatientStats(
        gram=cells,
        reference_time=reference,
        count_exposed=np.bincount(patient[exposed], minlength=num_patients),
        count_unexposed=np.bincount(patient[~exposed], minlength=num_patients),
    )


def _log_partition(eta: jax.Array, family: Family) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A(η), A'(η), A''(η) of one reading."""
    if family == "bernoulli":
        mean = jax.nn.sigmoid(eta)
        return jnp.logaddexp(0.0, eta), mean, mean * (1.0 - mean)
    rate = jnp.exp(jnp.minimum(eta, MAX_LINEAR_PREDICTOR))
    return rate, rate, rate


class CellTerms(NamedTuple):
    """ℓ_i(r), its gradient (g0, g1) and minus its Hessian P_i at r, (P,) arrays."""

    value: jax.Array
    grad: tuple[jax.Array, jax.Array]
    precision: Mat2


def cell_terms(a: jax.Array, b: jax.Array, cells: jax.Array, family: Family) -> CellTerms:
    """The patients' log-likelihoods at r = (a, b) from their cells (P, CELLS)."""
    n0, s0, n1, s1, constant = (cells[:, k] for k in range(CELLS))
    a_0, da_0, dda_0 = _log_partition(a, family)
    a_1, da_1, dda_1 = _log_partition(a + b, family)
    value = s0 * a - n0 * a_0 + s1 * (a + b) - n1 * a_1 + constant
    g0, g1 = s0 - n0 * da_0, s1 - n1 * da_1
    w0, w1 = n0 * dda_0, n1 * dda_1
    return CellTerms(value, (g0 + g1, g1), Mat2(w0 + w1, w1, w1, w1))


def _prior_precision(theta: Hyper) -> Mat2:
    """S = Σ⁻¹ (shared by all patients)."""
    chol = Mat2.from_array(theta.covariance_chol)
    cov = chol @ chol.T
    return cov.inverse_and_logdet()[0]


def conditional_mode(
    theta: Hyper,
    cells: jax.Array,
    mean0: jax.Array,
    mean1: jax.Array,
    start: tuple[jax.Array, jax.Array],
    family: Family,
    steps: int = NEWTON_STEPS,
) -> tuple[jax.Array, jax.Array]:
    """Each patient's mode of ℓ_i(r) + log N(r; m_i, Σ) by damped Newton from
    ``start``: step δ = (P_i(r) + S)⁻¹ ∇, then the best of STEP_LENGTHS along it
    (never worse than staying). The objective is strictly concave."""
    precision = _prior_precision(theta)

    def objective(a, b):
        da, db = a - mean0, b - mean1
        quad = precision.a * da * da + 2.0 * precision.b * da * db + precision.d * db * db
        return cell_terms(a, b, cells, family).value - 0.5 * quad

    def step(r, _):
        a, b = r
        terms = cell_terms(a, b, cells, family)
        pa, pb = precision.apply(a - mean0, b - mean1)
        grad0, grad1 = terms.grad[0] - pa, terms.grad[1] - pb
        hess = Mat2(*(p + s for p, s in zip(terms.precision, precision, strict=True)))
        delta0, delta1 = hess.inverse_and_logdet()[0].apply(grad0, grad1)
        best_a, best_b, best = a, b, objective(a, b)
        for length in STEP_LENGTHS:
            ta, tb = a + length * delta0, b + length * delta1
            value = objective(ta, tb)
            better = value > best
            best_a = jnp.where(better, ta, best_a)
            best_b = jnp.where(better, tb, best_b)
            best = jnp.where(better, value, best)
        return (best_a, best_b), None

    return jax.lax.scan(step, start, None, length=steps)[0]


def pseudo_gram(a: jax.Array, b: jax.Array, cells: jax.Array, family: Family) -> jax.Array:
    """The second-order expansion of every ℓ_i at r̂ = (a, b) as the Gram matrix
    (P, 3, 3) of Gaussian pseudo-data with σ = 1 and no fixed effects:

        [[P, h], [hᵀ, c]],  h = P r̂ + g,  c = −2 (ℓ(r̂) − gᵀr̂ − ½ r̂ᵀP r̂) − P_00 log 2π

    (c absorbs the Gaussian normaliser −½ n log 2π that the patient step takes
    from n = P_00), so model.likelihood.patient_terms with σ = 1 returns
    ∫ exp(ℓ̃_i(r)) N(r; m, Σ) dr for the expansion ℓ̃_i exactly."""
    terms = cell_terms(a, b, cells, family)
    p = terms.precision
    pr0, pr1 = p.apply(a, b)
    h0, h1 = pr0 + terms.grad[0], pr1 + terms.grad[1]
    constant = terms.value - (terms.grad[0] * a + terms.grad[1] * b) - 0.5 * (a * pr0 + b * pr1)
    c = -2.0 * constant - p.a * jnp.log(2.0 * jnp.pi)
    rows = [
        jnp.stack([p.a, p.b, h0], axis=-1),
        jnp.stack([p.c, p.d, h1], axis=-1),
        jnp.stack([h0, h1, c], axis=-1),
    ]
    return jnp.stack(rows, axis=-2)


def gaussian_theta(theta: Hyper) -> Hyper:
    """θ as the Gaussian collapse reads it for pseudo-data: σ = 1, no γ."""
    return theta._replace(
        sigma=jnp.ones_like(theta.tau_cohort), gamma=jnp.zeros(0, dtype=theta.mu.dtype)
    )


class Expansion(NamedTuple):
    """The Laplace step's result given θ: the joint mode's patient parts
    (mode0, mode1) = r̂_i, the patients' group shifts at the mode (their
    posterior means), and the pseudo-Gram matrices of the expansion there."""

    mode0: jax.Array
    mode1: jax.Array
    shift: jax.Array
    gram: jax.Array


def expand(
    theta: Hyper,
    cells: jax.Array,
    cohort: jax.Array,
    num_cohorts: int,
    config: ModelConfig,
    covariates: jax.Array | None = None,
    groups: jax.Array | None = None,
    num_groups: tuple[int, ...] = (),
    rounds: int = ROUNDS,
) -> Expansion:
    """The expansion of every patient's log-likelihood at the joint posterior
    mode of (r, u) given θ (module docstring).

    The search (``rounds`` of conditional modes of the patients, damped, and
    posterior means of the group shifts) runs on θ with its gradient stopped.
    It ends with one joint Newton step from there: the posterior mean of r
    under the Gaussian model expanded at the search's result, which *is* a
    Newton step of the log joint density (the priors are exactly quadratic).
    Its value moves the mode by no more than the search's residual, and its
    derivative in θ is the implicit-function derivative of the mode (a Newton
    map's Jacobian in its starting point vanishes at the root), so reverse mode
    never goes through the search."""
    family = config.family
    fixed = jax.lax.stop_gradient(theta)
    mean0, mean1 = prior_means(fixed, covariates)
    mean0 = jnp.broadcast_to(mean0, cells.shape[:1])
    mean1 = jnp.broadcast_to(mean1, cells.shape[:1])

    def round_(carry, _):
        mode, shift = carry
        mode = conditional_mode(fixed, cells, mean0, mean1 + shift, mode, family)
        gram = pseudo_gram(*mode, cells, family)
        shift, _ = patient_shift_posterior(
            gaussian_theta(fixed), gram, cohort, num_cohorts, config, covariates, groups, num_groups
        )
        return (mode, shift), None

    start = ((mean0, mean1), jnp.zeros_like(mean1))
    (mode, _), _ = jax.lax.scan(round_, start, None, length=rounds)

    # The joint Newton step, differentiable in θ.
    gauss = gaussian_theta(theta)
    gram = pseudo_gram(*mode, cells, family)
    shift, _ = patient_shift_posterior(
        gauss, gram, cohort, num_cohorts, config, covariates, groups, num_groups
    )
    terms = patient_terms(gauss, gram, config, covariates)
    mode0 = terms.cond_mean[0] + terms.m_inv_s.b * shift
    mode1 = terms.cond_mean[EFFECT] + terms.m_inv_s.d * shift
    return Expansion(mode0, mode1, shift, pseudo_gram(mode0, mode1, cells, family))


def laplace_loglik(
    theta: Hyper,
    cells: jax.Array,
    cohort: jax.Array,
    num_cohorts: int,
    config: ModelConfig,
    covariates: jax.Array | None = None,
    groups: jax.Array | None = None,
    num_groups: tuple[int, ...] = (),
) -> jax.Array:
    """Laplace approximation of log p(all evidence | θ) for a Bernoulli or Poisson
    measure, patient and group effects integrated out (module docstring).
    cells: (P, CELLS); the other arguments as for model.likelihood.collapsed_loglik.
    Differentiable in θ by autodiff. A patient without readings contributes 0."""
    expansion = expand(theta, cells, cohort, num_cohorts, config, covariates, groups, num_groups)
    return _collapsed_value(
        gaussian_theta(theta),
        expansion.gram,
        cohort,
        num_cohorts,
        config,
        covariates,
        groups,
        num_groups,
    )


class LocalPosterior(NamedTuple):
    """Each patient's Gaussian posterior of r_i = (a_i, b_i) given θ (P,) arrays:
    mean (mean0, mean1) and covariance (var0, cov01, var1); ``shrinkage`` the
    weight (M⁻¹S)_bb on the prior, ``expected`` (μ_i)_b, ``shift`` E[s_i]."""

    mean0: jax.Array
    mean1: jax.Array
    var0: jax.Array
    cov01: jax.Array
    var1: jax.Array
    shrinkage: jax.Array
    expected: jax.Array
    shift: jax.Array


def local_posterior(
    theta: Hyper,
    cells: jax.Array,
    cohort: jax.Array,
    num_cohorts: int,
    config: ModelConfig,
    covariates: jax.Array | None = None,
    groups: jax.Array | None = None,
    num_groups: tuple[int, ...] = (),
) -> LocalPosterior:
    """Every patient's posterior of (a_i, b_i) given θ under the expanded model:
    r_i | θ, y ~ N(M⁻¹h + M⁻¹S(μ_i + e_b E[s_i]), M⁻¹ + Var[s_i] l lᵀ), l = M⁻¹S e_b
    (model.likelihood.patient_effects_given_theta, both components)."""
    expansion = expand(theta, cells, cohort, num_cohorts, config, covariates, groups, num_groups)
    gauss = gaussian_theta(theta)
    shift_mean, shift_var = patient_shift_posterior(
        gauss, expansion.gram, cohort, num_cohorts, config, covariates, groups, num_groups
    )
    terms = patient_terms(gauss, expansion.gram, config, covariates)
    load0, load1 = terms.m_inv_s.b, terms.m_inv_s.d
    mean1 = terms.cond_mean[EFFECT] + load1 * shift_mean
    return LocalPosterior(
        mean0=terms.cond_mean[0] + load0 * shift_mean,
        mean1=mean1,
        var0=terms.m_inv.a + shift_var * load0**2,
        cov01=terms.m_inv.b + shift_var * load0 * load1,
        var1=terms.m_inv.d + shift_var * load1**2,
        shrinkage=load1,
        expected=jnp.broadcast_to(prior_means(theta, covariates)[EFFECT], mean1.shape),
        shift=shift_mean,
    )


def local_posterior_given_shift(
    theta: Hyper,
    cells: jax.Array,
    shift_mean: jax.Array,
    shift_var: jax.Array,
    config: ModelConfig,
    covariates: jax.Array | None = None,
    steps: int = ROUNDS * NEWTON_STEPS,
) -> LocalPosterior:
    """Every patient's posterior of (a_i, b_i) given θ when its total group
    shift's posterior N(shift_mean, shift_var) (P,) is given, as the streaming
    worker scores a patient with the cohort posteriors the population agent
    published (family_cohort_posteriors). The patient's log-likelihood is
    expanded at its conditional mode given the shift at its mean (``steps``
    damped Newton steps from the prior mean: as many as ``expand``'s search
    takes), which is the joint mode's patient part when the shift's mean is the
    joint mode's; then as local_posterior."""
    family = config.family
    mean0, mean1 = prior_means(theta, covariates)
    mean0 = jnp.broadcast_to(mean0, cells.shape[:1])
    mean1 = jnp.broadcast_to(mean1, cells.shape[:1]) + shift_mean
    mode = conditional_mode(theta, cells, mean0, mean1, (mean0, mean1), family, steps)
    gauss = gaussian_theta(theta)
    terms = patient_terms(gauss, pseudo_gram(*mode, cells, family), config, covariates)
    load0, load1 = terms.m_inv_s.b, terms.m_inv_s.d
    return LocalPosterior(
        mean0=terms.cond_mean[0] + load0 * shift_mean,
        mean1=terms.cond_mean[EFFECT] + load1 * shift_mean,
        var0=terms.m_inv.a + shift_var * load0**2,
        cov01=terms.m_inv.b + shift_var * load0 * load1,
        var1=terms.m_inv.d + shift_var * load1**2,
        shrinkage=load1,
        expected=jnp.broadcast_to(prior_means(theta, covariates)[EFFECT], cells.shape[:1]),
        shift=shift_mean,
    )


def cohort_effect_posterior_laplace(
    theta: Hyper,
    cells: jax.Array,
    cohort: jax.Array,
    num_cohorts: int,
    config: ModelConfig,
    covariates: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Posterior (mean, variance) of every cohort deviation given θ and every
    patient's cells, (num_cohorts,) each: the Gaussian one of the expansion at
    the joint mode (model.likelihood.cohort_effect_posterior of ``expand``'s
    pseudo-Gram matrices). Cohort level only (no further grouping levels)."""
    if config.grouping_levels:
        raise FamilyError("cohort posteriors of a family measure: no further grouping levels")
    expansion = expand(theta, cells, cohort, num_cohorts, config, covariates)
    return cohort_effect_posterior(
        gaussian_theta(theta), expansion.gram, cohort, num_cohorts, config, covariates
    )
