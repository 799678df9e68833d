"""Non-linear dependencies that stay linear in their weights: penalised splines of
a patient covariate and Fourier terms of the time of day.

Both are columns of designs the model already has, so every patient's effects
and every cohort's deviation still integrate out exactly (model.likelihood):

- **Splines (a smooth covariate).** A covariate v, standardised (v' = (v −
  location)/scale), gets its linear column v' plus the columns Z(v') of a cubic
  O'Sullivan spline (Wand & Ormerod 2008) in the patient design x_i, so the
  expected (intercept, effect) of a patient is μ + B x_i with

      f(v') = β v' + Σ_j u_j Z_j(v'),   ∫ f''(v')² dv' = Σ_j u_j²     (Z below)

  Z: cubic B-splines B(v') on ``knots`` (interior knots at quantiles, the
  boundary at the data's range) and the roughness penalty Ω_kl = ∫ B_k'' B_l'';
  with Ω = U diag(d) Uᵀ (d descending, the last two zero: the straight lines),
  Z = B U₊ diag(d₊)^(-1/2). Beyond the boundary Z is held at its boundary value
  (the curve continues with the linear slope β).

  The smoothing prior (``spline_prior``): each row (intercept, effect) of each
  smooth covariate's u has u_j ~ N(0, λ²), λ ~ HalfNormal(PriorConfig.smooth_scale),
  λ learned in θ. λ → 0 is the straight line, so the data decide how wiggly the
  curve is; it is the mixed-model form of a penalty λ⁻² ∫ f''².

- **Daily cycle.** Fourier terms cos(2πk h/24), sin(2πk h/24), k = 1..K, of a
  reading's hour h are time-varying covariates (population fixed effects next
  to the time trend, prior N(0, trend_sd²) on their standardised columns).

Column names carry the structure: a smooth covariate ``age`` has the design
columns ``age`` and ``age:s1`` … ``age:s{K+2}``; the daily cycle of hour
column ``hour`` has ``hour:cos1``, ``hour:sin1``, …. The priors find the
spline columns by these names (``spline_blocks``), so any subset of columns
(structure selection) keeps the right prior.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from model.config import ModelConfig
from model.events import Events
from model.splines import DEFAULT_KNOTS, SPLINE_COLUMN, SplineBasis
from model.splines import roughness_penalty as roughness_penalty  # re-exported

FOURIER_COLUMN = re.compile(r"^(?P<column>.+):(?P<kind>cos|sin)(?P<k>[0-9]+)$")
HOURS_PER_DAY = 24.0
CURVE_POINTS = 41


def spline_blocks(columns: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """The penalised spline columns among design ``columns``, by covariate."""
    blocks: dict[str, list[int]] = {}
    for index, column in enumerate(columns):
        match = SPLINE_COLUMN.match(column)
        if match:
            blocks.setdefault(match["covariate"], []).append(index)
    return {name: tuple(indices) for name, indices in blocks.items()}


def fourier_columns(column: str, harmonics: int) -> tuple[str, ...]:
    """``<column>:cos1``, ``<column>:sin1``, … for k = 1..harmonics."""
    return tuple(f"{column}:{kind}{k}" for k in range(1, harmonics + 1) for kind in ("cos", "sin"))


def fourier_design(hour: np.ndarray, harmonics: int) -> np.ndarray:
    """cos(2πk h/24), sin(2πk h/24), k = 1..K, of hours h: (n, 2K)."""
    angle = 2.0 * np.pi * np.asarray(hour, dtype=float)[:, None] / HOURS_PER_DAY
    k = np.arange(1, harmonics + 1)[None, :]
    return np.stack([np.cos(k * angle), np.sin(k * angle)], axis=-1).reshape(len(angle), -1)


def hour_of_day(time_in_days: np.ndarray) -> np.ndarray:
    """The hour in [0, 24) of a time counted in days (midnight at whole days)."""
    return HOURS_PER_DAY * np.mod(np.asarray(time_in_days, dtype=float), 1.0)


def spline_prior_scales(config: ModelConfig) -> tuple[np.ndarray, dict[str, tuple[int, ...]]]:
    """Which coefficient of B has which prior: (2, q) array of the fixed prior sd
    (covariate_sd; NaN where a spline's λ applies) and the spline blocks."""
    blocks = spline_blocks(config.covariates)
    scales = np.full((2, config.num_covariates), config.priors.covariate_sd)
    for indices in blocks.values():
        scales[:, list(indices)] = np.nan
    return scales, blocks


def sample_coefficients(config: ModelConfig) -> jax.Array:
    """numpyro sites of B (2, q), returned as B: ordinary columns B ~ N(0,
    covariate_sd²); each smooth covariate's spline columns B = λ z, z ~ N(0, 1)
    (non-centred: the same N(0, λ²) prior without the funnel between λ and the
    weights that a Gaussian guide, or NUTS, meets when the data say little about
    the curve), with ``smooth_sd`` λ (2, S) ~ HalfNormal(smooth_scale), one per
    row (intercept, effect) and smooth covariate. Site ``coef`` holds B's
    ordinary columns and z in the spline ones (``coefficients`` maps sites to
    B). The one prior of B, for the collapsed model (model.population) and the
    reference (model.reference)."""
    fixed, blocks = spline_prior_scales(config)
    smooth_sd = None
    if blocks:
        smooth_sd = numpyro.sample(
            "smooth_sd",
            dist.HalfNormal(config.priors.smooth_scale).expand([2, len(blocks)]).to_event(2),
        )
    site = numpyro.sample(
        "coef", dist.Normal(0.0, jnp.asarray(np.nan_to_num(fixed, nan=1.0))).to_event(2)
    )
    return coefficients(site, smooth_sd, config)


def coefficients(coef: jax.Array, smooth_sd: jax.Array | None, config: ModelConfig) -> jax.Array:
    """B from the sites of sample_coefficients, any leading draw axes: the spline
    columns of ``coef`` (z) times their row's and covariate's λ."""
    blocks = spline_blocks(config.covariates)
    if not blocks or smooth_sd is None:
        return coef
    block_of = np.full(config.num_covariates, -1)
    for block, indices in enumerate(blocks.values()):
        block_of[list(indices)] = block
    spline = jnp.asarray(block_of >= 0)
    scale = jnp.take(smooth_sd, jnp.asarray(np.maximum(block_of, 0)), axis=-1)
    return jnp.where(spline, coef * scale, coef)


@dataclasses.dataclass(frozen=True)
class SmoothDesign:
    """Events with their smooth terms' columns added, and what the curves need."""

    events: Events
    splines: tuple[SplineBasis, ...] = ()
    cycle_column: str | None = None
    harmonics: int = 0


def add_smooth_terms(
    events: Events,
    smooth: Sequence[str] = (),
    *,
    harmonics: int = 0,
    hour: np.ndarray | None = None,
    cycle_column: str = "hour",
    num_knots: int = DEFAULT_KNOTS,
) -> SmoothDesign:
    """``events`` with a spline of every covariate named in ``smooth`` (numeric
    columns of events.covariates, knots at quantiles of the patients' values)
    and ``harmonics`` Fourier pairs of the readings' hour of day (``hour`` (n,),
    default: from events.time in days, ``hour_of_day``) as time covariates.

    The spline columns are functions of the covariate standardised by its mean
    and sd over patients (the standardisation model.offline gives its linear
    column), so the knots are in those units."""
    names = list(events.covariate_names)
    covariates = events.covariates
    splines = []
    for name in smooth:
        if name not in names:
            raise ValueError(
                f"smooth covariate {name!r} is not a numeric patient covariate "
                f"(the covariates are {', '.join(names) or 'none'})"
            )
        values = np.asarray(covariates[:, names.index(name)], dtype=float)
        sd = float(values.std())
        standard = (values - values.mean()) / (sd if sd > 0 else 1.0)
        basis = SplineBasis.from_values(name, standard, num_knots)
        splines.append(basis)
        covariates = np.concatenate([covariates, basis.design(standard)], axis=-1)
        names.extend(basis.columns)
    time_covariates, time_names = events.time_covariates, list(events.time_covariate_names)
    if harmonics:
        hours = hour_of_day(events.time) if hour is None else np.asarray(hour, dtype=float)
        if hours.shape != np.shape(events.time):
            raise ValueError(f"hour has shape {hours.shape}, the readings {np.shape(events.time)}")
        if np.any((hours < 0) | (hours > HOURS_PER_DAY)) or not np.all(np.isfinite(hours)):
            raise ValueError("hours of day must lie in [0, 24]")
        columns = fourier_design(hours, harmonics)
        time_covariates = (
            columns if time_covariates is None else np.hstack([time_covariates, columns])
        )
        time_names.extend(fourier_columns(cycle_column, harmonics))
    events = dataclasses.replace(
        events,
        covariates=covariates,
        covariate_names=tuple(names),
        time_covariates=time_covariates,
        time_covariate_names=tuple(time_names),
    )
    return SmoothDesign(events, tuple(splines), cycle_column if harmonics else None, harmonics)


def band(draws: np.ndarray) -> dict[str, list[float]]:
    """Posterior mean and 90% band of curve draws (S, n) pointwise."""
    return {
        "mean": draws.mean(axis=0).tolist(),
        "q05": np.quantile(draws, 0.05, axis=0).tolist(),
        "q95": np.quantile(draws, 0.95, axis=0).tolist(),
    }


def covariate_curve_draws(
    basis: SplineBasis, grid: np.ndarray, coefficients: np.ndarray, config: ModelConfig
) -> np.ndarray:
    """Draws (S, 2, n) of the shift of a patient's expected (intercept, effect) at
    the covariate values ``grid`` (natural units), every other covariate at its
    centre, against a patient at all columns' centres: Σ_k B_k (x_k(v) − loc_k)
    over the covariate's linear and spline columns. coefficients (S, 2, q):
    B in natural units (Standardization.coefficients_to_raw)."""
    std = config.standardization
    names = list(config.covariates)
    linear = names.index(basis.covariate)
    location, scale = std.covariate_location[linear], std.covariate_scale[linear]
    grid = np.asarray(grid, dtype=float)
    columns = [linear, *(names.index(column) for column in basis.columns)]
    design = np.column_stack([grid, basis.design((grid - location) / scale)])
    centre = np.asarray([std.covariate_location[k] for k in columns])
    return np.einsum("srk,nk->srn", coefficients[:, :, columns], design - centre)


def cycle_curve_draws(
    column: str, harmonics: int, hours: np.ndarray, time_coefficients: np.ndarray, config
) -> np.ndarray:
    """Draws (S, n) of the daily cycle at ``hours``: Σ_k γ_k c_k(h) in outcome
    units, the shift of a reading at hour h from the day's mean (each Fourier
    term averages 0 over the day). time_coefficients (S, k): natural units
    (Standardization.time_coefficients_to_raw)."""
    names = list(config.time_covariates)
    columns = [names.index(name) for name in fourier_columns(column, harmonics)]
    return time_coefficients[:, columns] @ fourier_design(hours, harmonics).T


def daily_cycle(config: ModelConfig) -> tuple[str, int] | None:
    """(hour column, K) of the daily cycle among ``config``'s time covariates
    (their names ``<column>:cos1``, ``<column>:sin1``, … ``:sin{K}``), or None."""
    harmonics: dict[str, int] = {}
    for name in config.time_covariates:
        match = FOURIER_COLUMN.match(name)
        if match:
            column = match["column"]
            harmonics[column] = max(harmonics.get(column, 0), int(match["k"]))
    if not harmonics:
        return None
    column, count = next(iter(harmonics.items()))
    return column, count


def curve_summaries(population: dict, config: ModelConfig, effect: np.ndarray) -> dict[str, object]:
    """JSON-ready curves of ``config``'s smooth terms: for every smooth covariate
    (ModelConfig.splines) the expected effect (the population effect plus the
    modifier) and intercept shift over a grid of CURVE_POINTS values across the
    knots' boundary, natural units; the daily cycle (``daily_cycle``) over the
    hours 0..24. Mean and 90% band pointwise. ``population``: the draws of
    ``coefficients`` and ``time_coefficients`` in natural units
    (model.offline.population_quantities); ``effect``: the population effect's
    draws, raw units. The one computation of the curves: ``efficacy fit``'s JSON
    and the stream's PopulationPosterior both publish it."""
    result: dict[str, object] = {}
    curves = []
    std = config.standardization
    for basis in config.splines:
        k = list(config.covariates).index(basis.covariate)
        low, high = (
            std.covariate_location[k] + std.covariate_scale[k] * edge for edge in basis.boundary
        )
        grid = np.linspace(low, high, CURVE_POINTS)
        draws = covariate_curve_draws(basis, grid, population["coefficients"], config)
        curves.append(
            {
                "covariate": basis.covariate,
                "grid": grid.tolist(),
                "effect": band(effect[:, None] + draws[:, 1]),
                "intercept_shift": band(draws[:, 0]),
            }
        )
    if config.splines:
        result["curves"] = curves
    cycle = daily_cycle(config)
    if cycle is not None:
        hours = np.linspace(0.0, HOURS_PER_DAY, CURVE_POINTS)
        draws = cycle_curve_draws(*cycle, hours, population["time_coefficients"], config)
        result["daily_cycle"] = {"hour": hours.tolist(), **band(draws)}
    return result
