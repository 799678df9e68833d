"""Structure selection by cross-validated predictive density over held-out patients.

Candidate structures of one measure's model (ModelConfig):

- ``complete``: complete pooling of the effect, one effect for everyone
  (τ_b ≈ 0; intercepts still vary by patient);
- ``none``: no pooling, each patient's effect with a very wide prior (τ_b = 10
  outcome sds), nothing borrowed;
- ``partial``: partial pooling by patient (the design's model without a cohort level);
- ``partial+<attribute>``: partial pooling plus a cohort level, once for every
  cohort attribute available;
- ``partial+<a>+<b>…``: with several attributes, every combination of two or
  more as crossed (or nested) grouping levels, each with its own sd
  (ModelConfig.grouping_levels; the first attribute is the cohort level), so
  each level is compared with and without the others;
- ``partial+x:<c>+x:<d>…``: with patient covariates (model.covariates), partial
  pooling with every covariate block (a covariate's design columns) in the mean
  of the patients' effects, and with all blocks but one for each block, so each
  block is compared with and without it given the others. The structures
  above have no covariates.

**Criterion.** K-fold cross-validation over *patients*, from the sufficient
statistics alone. Patients are split into K folds (the same folds for every
structure, so differences are paired). For fold k, q_k(θ) is fitted by SVI to the
Gram matrices of the other folds' patients (PopulationFitter), and every held-out
patient i gets

    elpd_i = log (1/S) Σ_s p(y_i | θ_s, training),      θ_s ~ q_k(θ)

where, with the patient's effects r_i integrated out exactly (model.likelihood),

    log p(y_i | θ, u) = log L_i(μ) + k_i u − ½ j_i u²

and, with a cohort level, u = u_g(i) ~ N(m_g, v_g) is the cohort deviation's
posterior given θ and the *training* patients of the same cohort (a cohort with
no training patient gets its prior N(0, τ_u²)), so that

    log p(y_i | θ, training) = log L_i(μ) + k_i m_g − ½ j_i m_g²
                               + ½ v_g (k_i − j_i m_g)² / (1 + j_i v_g) − ½ log(1 + j_i v_g).

With several grouping levels u is the patient's total shift s_i = Σ_l u_{l, g_l(i)},
whose posterior given θ and the training patients is N(a_iᵀ E[u], a_iᵀ Cov[u] a_i)
(the groups' joint posterior, model.likelihood.group_effect_posterior; a group
with no training patient keeps its prior): the same formula with m = E[s_i],
v = Var[s_i]. Without a cohort level it is log L_i(μ). Densities are reported for the raw
outcome: the standardised density minus n_i log(outcome_scale) (the same shift
for every structure, so differences do not depend on it).

**Report.** Per structure the total elpd = Σ_i elpd_i, the difference to the best
structure and its standard error from the pointwise differences d_i (as for
PSIS-LOO, Vehtari, Gelman & Gabry 2017): se = sqrt(n · var(d_i)), n patients.
A structure "wins" when its lead exceeds two standard errors; ``choose`` keeps
the design's model (partial pooling by patient) unless another structure wins
against it, and among structures that do, a structure with fewer grouping
levels is kept unless one with more (a superset of its levels) beats it by the
same margin: each level must earn its place.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp
from pydantic import BaseModel, ConfigDict

from model.config import ModelConfig, SVIConfig
from model.evidence import PatientStats
from model.likelihood import (
    Hyper,
    cohort_effect_posterior,
    group_effect_posterior,
    group_index,
    patient_terms,
    shift_moments,
)
from model.population import (
    PopulationFitter,
    UpdateInfo,
    bucket_size,
    hyper_from_sites,
    pad_evidence,
)

# SVI settings for the K fits of every structure: fewer particles than a
# production fit (the CV criterion averages over S draws and n patients, so the
# q(θ) noise of 4 particles is far below the patient-level spread of elpd_i).
SELECTION_SVI = SVIConfig(fresh_steps=600, num_particles=4, num_draws=200)


class Structure(BaseModel):
    """One candidate: its name, the model configuration and, with a cohort level,
    the cohort attribute whose levels are the cohorts, and the attributes of any
    further grouping levels (config.grouping_levels, in that order)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    config: ModelConfig
    cohort_attribute: str | None = None
    group_attributes: tuple[str, ...] = ()
    covariate_columns: tuple[int, ...] = ()  # columns of the full covariate design


def with_covariate_columns(config: ModelConfig, columns: Sequence[int]) -> ModelConfig:
    """``config`` with only the given columns of its patient covariates (their
    names and standardisation), and the spline bases (ModelConfig.splines) whose
    covariate and columns all remain."""
    std = config.standardization

    def pick(values: tuple[float, ...]) -> tuple[float, ...]:
        return tuple(values[k] for k in columns) if values else ()

    kept = {config.covariates[k] for k in columns}
    return config.model_copy(
        update={
            "covariates": tuple(config.covariates[k] for k in columns),
            "splines": tuple(
                basis
                for basis in config.splines
                if basis.covariate in kept and set(basis.columns) <= kept
            ),
            "standardization": std.model_copy(
                update={
                    "covariate_location": pick(std.covariate_location),
                    "covariate_scale": pick(std.covariate_scale),
                }
            ),
        }
    )


def candidate_structures(
    base: ModelConfig,
    cohort_attributes: Sequence[str] = (),
    covariate_blocks: Mapping[str, Sequence[int]] | None = None,
) -> list[Structure]:
    """complete, none, partial, one partial+cohort structure per attribute and,
    with several attributes, one per combination of two or more of them; with
    ``covariate_blocks`` (block name → its columns of ``base.covariates``),
    partial pooling with every block and with all blocks but each one.

    ``base`` supplies the time trend, forgetting, priors and standardisation.
    """
    blocks = {name: tuple(columns) for name, columns in (covariate_blocks or {}).items()}
    covariate_base = base
    base = with_covariate_columns(base, ())
    flat = base.model_copy(update={"cohort_level": False, "grouping_levels": ()})
    structures = [
        Structure(name="complete", config=flat.model_copy(update={"effect_pooling": "complete"})),
        Structure(name="none", config=flat.model_copy(update={"effect_pooling": "none"})),
        Structure(name="partial", config=flat.model_copy(update={"effect_pooling": "partial"})),
    ]
    grouped = base.model_copy(update={"cohort_level": True, "effect_pooling": "partial"})
    for attribute in cohort_attributes:
        structures.append(
            Structure(
                name=f"partial+{attribute}",
                config=grouped.model_copy(update={"grouping_levels": ()}),
                cohort_attribute=attribute,
            )
        )
    for size in range(2, len(cohort_attributes) + 1):
        for first, *further in itertools.combinations(cohort_attributes, size):
            structures.append(
                Structure(
                    name="+".join(["partial", first, *further]),
                    config=grouped.model_copy(update={"grouping_levels": tuple(further)}),
                    cohort_attribute=first,
                    group_attributes=tuple(further),
                )
            )
    if not blocks:
        return structures
    flat_partial = covariate_base.model_copy(
        update={"cohort_level": False, "grouping_levels": (), "effect_pooling": "partial"}
    )
    subsets = [tuple(blocks)]
    if len(blocks) > 1:
        subsets += [tuple(b for b in blocks if b != left_out) for left_out in blocks]
    for subset in subsets:
        columns = tuple(sorted(k for name in subset for k in blocks[name]))
        structures.append(
            Structure(
                name="+".join(["partial", *(f"x:{name}" for name in subset)]),
                config=with_covariate_columns(flat_partial, columns),
                covariate_columns=columns,
            )
        )
    return structures


def patient_folds(num_patients: int, num_folds: int, seed: int) -> np.ndarray:
    """Fold index of every patient: a seeded random permutation cut into K nearly
    equal parts (K is capped at the number of patients: leave-one-out)."""
    if num_patients < 2:
        raise ValueError("cross-validation over patients needs at least 2 patients")
    num_folds = min(num_folds, num_patients)
    order = np.random.default_rng(seed).permutation(num_patients)
    folds = np.empty(num_patients, dtype=np.int64)
    folds[order] = np.arange(num_patients) % num_folds
    return folds


@partial(jax.jit, static_argnames=("num_cohorts", "config", "num_groups"))
def heldout_loglik(
    draws: Hyper,
    train_gram: jax.Array,
    train_cohort: jax.Array,
    test_gram: jax.Array,
    test_cohort: jax.Array,
    num_cohorts: int,
    config: ModelConfig,
    train_groups: jax.Array | None = None,
    test_groups: jax.Array | None = None,
    num_groups: tuple[int, ...] = (),
    train_covariates: jax.Array | None = None,
    test_covariates: jax.Array | None = None,
) -> jax.Array:
    """log p(y_i | θ_s, training patients) of every held-out patient under every
    draw, shape (S, P_test), standardised units (module docstring). With further
    grouping levels, train_groups and test_groups (P, L) and num_groups as for
    model.likelihood.collapsed_loglik; with patient covariates, train_covariates
    and test_covariates (P, q) standardised.

    Padding (zero Gram matrices) gives exactly 0 on either side.
    """

    def one(theta: Hyper) -> jax.Array:
        terms = patient_terms(theta, test_gram, config, test_covariates)
        if not config.cohort_level:
            return terms.at_mean
        if config.grouping_levels:
            mean, cov = group_effect_posterior(
                theta, train_gram, train_cohort, num_cohorts, config, train_covariates,
                train_groups, num_groups,
            )  # fmt: skip
            where = group_index(test_cohort, num_cohorts, test_groups, num_groups)
            m, v = shift_moments(mean, cov, where.index)
        else:
            m, v = cohort_effect_posterior(
                theta, train_gram, train_cohort, num_cohorts, config, train_covariates
            )
            m, v = m[test_cohort], v[test_cohort]
        j, k = terms.curvature, terms.slope
        gap = k - j * m
        return (
            terms.at_mean
            + k * m
            - 0.5 * j * m**2
            + 0.5 * v * gap**2 / (1.0 + j * v)
            - 0.5 * jnp.log1p(j * v)
        )

    return jax.lax.map(one, draws)


FitterCache = dict[tuple[ModelConfig, SVIConfig], tuple[PopulationFitter, Callable]]


def _compiled(
    config: ModelConfig, svi_config: SVIConfig, cache: FitterCache | None
) -> tuple[PopulationFitter, Callable]:
    """A PopulationFitter and a jitted sampler of its q(θ) (eager sampling costs
    seconds per fold), from ``cache`` when it holds them for this configuration.

    Keyed by ``config.structure``: the fit sees standardised statistics only, so
    measures that differ only in units share one compilation."""
    config = config.structure
    if cache is not None and (config, svi_config) in cache:
        return cache[config, svi_config]
    fitter = PopulationFitter(config, svi_config)

    @jax.jit
    def draw(params: dict[str, jax.Array], key: jax.Array) -> Hyper:
        sites = fitter.guide.sample_posterior(key, params, sample_shape=(svi_config.num_draws,))
        return hyper_from_sites(sites, config)

    if cache is not None:
        cache[config, svi_config] = (fitter, draw)
    return fitter, draw


def _subset(stats: PatientStats, rows: np.ndarray) -> PatientStats:
    return PatientStats(*(np.asarray(field)[rows] for field in stats))


def _padded(array: np.ndarray, size: int) -> np.ndarray:
    pad = [(0, size - array.shape[0])] + [(0, 0)] * (array.ndim - 1)
    return np.pad(array, pad)


def cross_validate_folds(
    structure: Structure,
    stats: PatientStats,
    cohort: np.ndarray | None,
    folds: np.ndarray,
    *,
    seed: int = 0,
    svi_config: SVIConfig = SELECTION_SVI,
    fitters: FitterCache | None = None,
    groups: np.ndarray | None = None,
    covariates: np.ndarray | None = None,
) -> Iterator[tuple[int, np.ndarray, np.ndarray, UpdateInfo]]:
    """cross_validate one fold at a time: a generator whose every step is one SVI
    fit, yielding (fold, held-out rows, their raw-outcome elpd_i, the fit's info).

    A caller that must not hold the CPU for all K fits at once (the streaming
    population agent) advances it step by step; ``cross_validate`` runs it out.
    groups: (P, L) group index of every patient at each of the structure's
    further grouping levels (structure.group_attributes), None without;
    covariates: (P, q) the full standardised covariate design, of which the
    structure uses its covariate_columns.
    """
    config = structure.config
    num_patients = stats.num_patients
    if cohort is None or not config.cohort_level:
        cohort = np.zeros(num_patients, dtype=np.int64)
    cohort = np.asarray(cohort, dtype=np.int64)
    num_cohorts = int(cohort.max()) + 1
    num_groups: tuple[int, ...] = ()
    if config.grouping_levels:
        groups = np.asarray(groups, dtype=np.int64).reshape(num_patients, -1)
        num_groups = tuple(int(count) for count in groups.max(axis=0) + 1)
    x = None
    if structure.covariate_columns:
        x = np.asarray(covariates, dtype=float)[:, list(structure.covariate_columns)]
    fitter, draw = _compiled(config, svi_config, fitters)
    num_folds = int(folds.max()) + 1
    keys = jax.random.split(jax.random.PRNGKey(seed), num_folds)
    # standardised → raw outcome density: y' = (y − loc)/scale for n_i (weighted) rows
    shift = stats.gram[:, 0, 0] * np.log(config.standardization.outcome_scale)
    for fold in range(num_folds):
        test = np.flatnonzero(folds == fold)
        train = np.flatnonzero(folds != fold)
        evidence = pad_evidence(
            _subset(stats, train),
            cohort[train],
            num_cohorts,
            None if x is None else x[train],
            groups=None if groups is None else groups[train],
            num_groups=num_groups,
        )
        key_init, key_fit, key_draws = jax.random.split(keys[fold], 3)
        state = fitter.init(key_init, evidence)
        state, info = fitter.update(state, evidence, key_fit)
        draws = draw(fitter.params(state), key_draws)
        size = bucket_size(test.size, 8)
        loglik = heldout_loglik(
            draws,
            evidence.gram,
            evidence.cohort,
            jnp.asarray(_padded(stats.gram[test], size)),
            jnp.asarray(_padded(cohort[test], size)),
            evidence.num_cohorts,
            config.structure,
            evidence.groups,
            None if groups is None else jnp.asarray(_padded(groups[test], size)),
            evidence.num_groups,
            evidence.covariates,
            None if x is None else jnp.asarray(_padded(x[test], size)),
        )
        loglik = np.asarray(loglik)[:, : test.size]
        elpd = np.asarray(logsumexp(loglik, axis=0)) - np.log(loglik.shape[0])
        yield fold, test, elpd - shift[test], info


def cross_validate(
    structure: Structure,
    stats: PatientStats,
    cohort: np.ndarray | None,
    folds: np.ndarray,
    *,
    seed: int = 0,
    svi_config: SVIConfig = SELECTION_SVI,
    fitters: FitterCache | None = None,
    progress: Callable[[str], None] | None = None,
    groups: np.ndarray | None = None,
    covariates: np.ndarray | None = None,
) -> np.ndarray:
    """Pointwise elpd_i (raw-outcome log density) of every patient held out in its fold.

    ``stats`` must be computed with ``structure.config`` (same standardisation
    for all structures). ``cohort``: (P,) cohort index under the structure's
    attribute (ignored without a cohort level). One PopulationFitter per
    structure, so its SVI step compiles once for all folds of the same padded size;
    pass a ``fitters`` dict to reuse the compiled fitters across calls.
    """
    elpd = np.empty(stats.num_patients)
    num_folds = int(folds.max()) + 1
    for fold, test, values, info in cross_validate_folds(
        structure,
        stats,
        cohort,
        folds,
        seed=seed,
        svi_config=svi_config,
        fitters=fitters,
        groups=groups,
        covariates=covariates,
    ):
        elpd[test] = values
        if progress is not None:
            progress(
                f"  {structure.name}: fold {fold + 1}/{num_folds}, "
                f"ELBO {info.elbo:,.1f}, held-out elpd {values.sum():,.1f}"
            )
    return elpd


def compare(pointwise: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """The comparison table, best first: per structure elpd = Σ_i elpd_i, its se
    sqrt(n var(elpd_i)), and the difference to the best with its se from the
    pointwise differences, sqrt(n var(d_i)) (d_i = elpd_i(best) − elpd_i(structure))."""
    names = list(pointwise)
    totals = {name: float(np.sum(pointwise[name])) for name in names}
    best = max(names, key=lambda name: totals[name])
    rows = []
    for name in sorted(names, key=lambda name: -totals[name]):
        values = np.asarray(pointwise[name])
        n = values.size
        diff = np.asarray(pointwise[best]) - values
        rows.append(
            {
                "structure": name,
                "elpd": totals[name],
                "elpd_se": float(np.sqrt(n * np.var(values, ddof=1))) if n > 1 else float("nan"),
                "elpd_diff": float(totals[name] - totals[best]),
                "diff_se": float(np.sqrt(n * np.var(diff, ddof=1))) if n > 1 else float("nan"),
            }
        )
    return rows


def choose(
    pointwise: Mapping[str, np.ndarray], reference: str = "partial", threshold: float = 2.0
) -> str:
    """The structure to use: the ``reference`` (the design's model, partial pooling
    by patient) unless others beat it by more than ``threshold`` standard errors
    of the paired difference, sqrt(n var(d_i)); then the best of those, unless a
    winner with a subset of its grouping levels (``partial+a`` against
    ``partial+a+b``) is not beaten by it by that margin: then that one, and so
    on down, so that every level kept has earned its place.

    A structure must earn its place against the reference: noise-level leads
    (a cohort level fitted to no cohort effects, complete pooling on 18 patients)
    do not move the choice. Without the reference, the best structure.
    """
    totals = {name: float(np.sum(values)) for name, values in pointwise.items()}
    if reference not in pointwise:
        return max(totals, key=totals.__getitem__)

    def beats(name: str, other: str) -> bool:
        diff = np.asarray(pointwise[name]) - np.asarray(pointwise[other])
        se = float(np.sqrt(diff.size * np.var(diff, ddof=1))) if diff.size > 1 else np.inf
        return bool(diff.sum() > threshold * se)

    winners = [name for name in pointwise if name != reference and beats(name, reference)]
    if not winners:
        return reference
    best = max(winners, key=totals.__getitem__)
    while True:
        parts = set(best.split("+"))
        simpler = [
            name for name in winners if set(name.split("+")) < parts and not beats(best, name)
        ]
        if not simpler:
            return best
        best = max(simpler, key=totals.__getitem__)


def select_structure(
    stats_for: Callable[[ModelConfig], PatientStats],
    base: ModelConfig,
    cohorts: Mapping[str, np.ndarray] | None = None,
    *,
    num_folds: int = 5,
    seed: int = 0,
    svi_config: SVIConfig = SELECTION_SVI,
    only: Sequence[str] | None = None,
    fitters: FitterCache | None = None,
    progress: Callable[[str], None] | None = None,
    covariates: np.ndarray | None = None,
    covariate_blocks: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, Any]:
    """Compare every candidate structure by K-fold CV over patients.

    stats_for(config): the patients' statistics under a structure's config (the
    Gram matrices depend only on time_trend and standardisation, so callers may
    return the same statistics every time). cohorts: attribute name → (P,)
    cohort index of every patient; attributes with a single level are skipped
    (a cohort level is not identified there). ``only``: compare just these
    structure names (default: all candidates). ``fitters``: a dict that keeps
    compiled fitters across calls (see cross_validate). covariates: (P, q) the
    standardised design of ``base.covariates``; covariate_blocks: block name →
    its columns (each block compared with and without it, candidate_structures).

    Returns a JSON-ready dict: ``table`` (compare, best first), ``best``,
    ``choice`` (choose), ``num_folds``, ``num_patients``, ``seed``, the
    skipped attributes and the ``pointwise`` elpd_i of every structure.
    """
    cohorts = dict(cohorts or {})
    skipped = [name for name, index in cohorts.items() if np.unique(index).size < 2]
    usable = {name: np.asarray(index) for name, index in cohorts.items() if name not in skipped}
    structures = candidate_structures(base, list(usable), covariate_blocks)
    if only is not None:
        unknown = set(only) - {structure.name for structure in structures}
        if unknown:
            raise ValueError(f"unknown structure(s) {sorted(unknown)}")
        structures = [structure for structure in structures if structure.name in only]
    pointwise: dict[str, np.ndarray] = {}
    folds: np.ndarray | None = None
    for number, structure in enumerate(structures):
        stats = stats_for(structure.config)
        if folds is None:
            folds = patient_folds(stats.num_patients, num_folds, seed)
        if progress is not None:
            progress(f"structure {number + 1}/{len(structures)}: {structure.name}")
        cohort = usable.get(structure.cohort_attribute) if structure.cohort_attribute else None
        groups = None
        if structure.group_attributes:
            groups = np.stack([usable[name] for name in structure.group_attributes], axis=-1)
        pointwise[structure.name] = cross_validate(
            structure,
            stats,
            cohort,
            folds,
            seed=seed,
            svi_config=svi_config,
            fitters=fitters,
            progress=progress,
            groups=groups,
            covariates=covariates,
        )
    table = compare(pointwise)
    assert folds is not None
    return {
        "table": table,
        "best": table[0]["structure"],
        "choice": choose(pointwise),
        "num_folds": int(folds.max()) + 1,
        "num_patients": int(folds.size),
        "seed": seed,
        "skipped_attributes": skipped,
        "pointwise": {name: values.tolist() for name, values in pointwise.items()},
    }


def format_table(selection: Mapping[str, Any]) -> str:
    """Plain-text table of a selection result."""
    lines = [
        f"{'structure':<24}{'elpd':>12}{'se':>9}{'diff':>11}{'diff se':>9}",
    ]
    for row in selection["table"]:
        lines.append(
            f"{row['structure']:<24}{row['elpd']:>12.1f}{row['elpd_se']:>9.1f}"
            f"{row['elpd_diff']:>11.1f}{row['diff_se']:>9.1f}"
        )
    lines.append(
        f"best: {selection['best']}; choice (partial pooling unless beaten by > 2 se): "
        f"{selection['choice']} ({selection['num_folds']}-fold CV over "
        f"{selection['num_patients']} patients)"
    )
    return "\n".join(lines)
