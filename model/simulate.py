"""Programmes with known truth, for validation, tests, benchmarks and the demo.

Patients are enrolled in cohorts, observed over a time span with a baseline
(unexposed) period then exposure, or a crossover (exposed, withdrawn, exposed
again). Readings go missing at random and a fraction are outliers. The true
model is the project's model in raw units:

    y_it = a_i + b_i x_it + γ t_it + δ c_it + d(h_it) + ε_it
    (a_i, b_i) ~ N((α, β + u_g + v_k + s(age_i)) + B x_i, Σ)

optionally with a population effect that changes at a point in time (drift),
patient covariates x_i that modify the effect (a continuous one, ``age``, and a
categorical one, ``group``), a second grouping crossed with the cohorts
(``num_clusters`` genotype clusters k with effect deviations v_k ~ N(0,
``cluster_effect_sd``²), published as the events' ``cluster`` level), a
time-varying covariate c_it that is confounded
with exposure, partial adherence (the exposure x_it a dose in [0, 1]), a
non-linear effect modifier s(age) that saturates (``effect_saturation``, zero
at the mean age) and a daily cycle d(h) of the reading's hour of day h
(``daily_amplitudes``; time is in days, midnight at whole days). The true
curves are ``true_effect_at`` and ``true_daily_cycle``.
Everything is vectorised: 1M patients are simulated in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from model.events import Events


class ProgrammeSpec(BaseModel):
    """What to simulate, raw units (defaults: resting heart rate in bpm, days)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_patients: int = Field(default=500, ge=1)
    num_cohorts: int = Field(default=20, ge=1)
    obs_per_patient: int = Field(default=30, ge=2)
    time_span: float = Field(default=90.0, gt=0.0, description="days each patient is followed")
    baseline_fraction: float = Field(default=0.3, ge=0.0, le=1.0)
    design: Literal["baseline_then_exposure", "crossover"] = "baseline_then_exposure"
    dose: float = 1.0
    intercept: float = 70.0
    effect: float = -4.0
    time_trend: float = -0.01
    intercept_sd: float = Field(default=6.0, ge=0.0)
    effect_sd: float = Field(default=3.0, ge=0.0)
    correlation: float = Field(default=-0.2, ge=-1.0, le=1.0)
    cohort_effect_sd: float = Field(default=1.5, ge=0.0)
    residual_sd: float = Field(default=4.0, gt=0.0)
    missing_rate: float = Field(default=0.0, ge=0.0, lt=1.0)
    outlier_rate: float = Field(default=0.0, ge=0.0, lt=1.0)
    outlier_scale: float = Field(default=8.0, gt=0.0, description="outlier sd in residual sds")
    effect_change_at: float | None = Field(
        default=None, ge=0.0, le=1.0, description="fraction of the time span where β changes"
    )
    effect_after_change: float | None = None
    with_covariates: bool = Field(
        default=False, description="publish age and group (covariates) with the events"
    )
    age_mean: float = 55.0
    age_sd: float = Field(default=12.0, gt=0.0)
    effect_per_year: float = Field(default=0.0, description="effect modifier: effect per year")
    intercept_per_year: float = 0.0
    group_effects: tuple[float, ...] = Field(
        default=(),
        description="effect shift of group levels 1.. against level 0 (equally likely levels)",
    )
    time_covariate_effect: float | None = Field(
        default=None, description="δ: outcome per unit of a time-varying covariate (None: none)"
    )
    time_covariate_confounding: float = Field(
        default=0.0, description="c_it = this × exposure + N(0, 1): confounded with exposure"
    )
    adherence_low: float = Field(
        default=1.0, gt=0.0, le=1.0, description="dose while exposed ~ U(adherence_low, 1)"
    )
    num_clusters: int = Field(
        default=0, ge=0, description="genotype clusters crossed with the cohorts (0: none)"
    )
    cluster_effect_sd: float = Field(default=0.0, ge=0.0, description="sd of the clusters' effects")
    effect_saturation: float = Field(
        default=0.0,
        description="A of s(age) = A (tanh((age − c)/w) − tanh((age_mean − c)/w)): effect shift",
    )
    saturation_age: float = Field(default=55.0, description="c of s(age), years")
    saturation_width: float = Field(default=6.0, gt=0.0, description="w of s(age), years")
    daily_amplitudes: tuple[float, ...] = Field(
        default=(), description="A_k of d(h) = Σ_k A_k cos(2πk (h − daily_peak_hour)/24)"
    )
    daily_peak_hour: float = 16.0


@dataclass(frozen=True)
class Truth:
    """The values the simulation drew: per patient, per cohort and population."""

    intercept: np.ndarray  # (P,) a_i
    effect: np.ndarray  # (P,) b_i per unit exposure (before any population change)
    cohort_effect: np.ndarray  # (G,) u_g
    enrolment_time: np.ndarray  # (P,) start of each patient's follow-up
    population_effect: float
    population_effect_after_change: float | None
    change_time: float | None
    covariate_names: tuple[str, ...] = ()
    coefficients: np.ndarray | None = None  # (2, q) B in natural units, rows (a, b)
    time_covariate_effect: float | None = None
    cluster_of_patient: np.ndarray | None = None  # (P,) genotype cluster k of each patient
    cluster_effect: np.ndarray | None = None  # (K,) v_k


@dataclass(frozen=True)
class Simulated:
    spec: ProgrammeSpec
    events: Events
    truth: Truth


def exposure_schedule(spec: ProgrammeSpec, phase: np.ndarray) -> np.ndarray:
    """Exposure at each observation from its phase in [0, 1) of follow-up."""
    on = phase >= spec.baseline_fraction
    if spec.design == "crossover":
        # exposed, withdrawn for the middle third of the exposure period, exposed again
        exposed_span = 1.0 - spec.baseline_fraction
        start = spec.baseline_fraction + exposed_span / 3.0
        stop = spec.baseline_fraction + 2.0 * exposed_span / 3.0
        on &= ~((phase >= start) & (phase < stop))
    return on * spec.dose


def simulate(spec: ProgrammeSpec, seed: int) -> Simulated:
    """Draw a programme from ``spec``; deterministic given ``seed``."""
    rng = np.random.default_rng(seed)
    p, g, t_count = spec.num_patients, spec.num_cohorts, spec.obs_per_patient
    cohort = rng.integers(0, g, p)
    cohort_effect = rng.normal(0.0, spec.cohort_effect_sd, g)
    z = rng.standard_normal((p, 2))
    rho = spec.correlation
    intercept = spec.intercept + spec.intercept_sd * z[:, 0]
    effect_dev = spec.effect_sd * (rho * z[:, 0] + np.sqrt(1.0 - rho**2) * z[:, 1])
    effect = spec.effect + cohort_effect[cohort] + effect_dev
    covariates, names, coefficients = _patient_covariates(spec, rng, p)
    if covariates is not None:
        # Centred at the simulated means, so spec.effect is the effect of a patient
        # of average age in group 0.
        shift = (covariates - _covariate_means(spec)) @ coefficients.T
        intercept = intercept + shift[:, 0]
        effect = effect + shift[:, 1] + _saturation(spec, covariates[:, 0])
    cluster = cluster_effect = None
    if spec.num_clusters:
        # Its own stream, so adding clusters leaves every other draw of a seed as it was.
        cluster_rng = np.random.default_rng([seed, 1])
        cluster = cluster_rng.integers(0, spec.num_clusters, p)
        cluster_effect = cluster_rng.normal(0.0, spec.cluster_effect_sd, spec.num_clusters)
        effect = effect + cluster_effect[cluster]
    # Staggered enrolment over the first half of the programme.
    enrolment = rng.uniform(0.0, spec.time_span / 2.0, p)

    # A reading on a regular grid, shifted by a random offset per patient.
    phase = ((np.arange(t_count)[None, :] + rng.uniform(0.0, 1.0, (p, 1))) / t_count).ravel()
    patient = np.repeat(np.arange(p), t_count)
    time = enrolment[patient] + phase * spec.time_span
    if spec.daily_amplitudes:
        # A wearable reads at any hour: a random time of day for every reading (its
        # own stream, so the other draws of a seed stay as they were).
        time = np.floor(time) + np.random.default_rng([seed, 2]).uniform(0.0, 1.0, time.size)
    exposure = exposure_schedule(spec, phase)
    if spec.adherence_low < 1.0:
        exposure = exposure * rng.uniform(spec.adherence_low, 1.0, exposure.size)

    change_time = None
    patient_effect = effect[patient]
    if spec.effect_change_at is not None and spec.effect_after_change is not None:
        change_time = spec.effect_change_at * 1.5 * spec.time_span
        shift = spec.effect_after_change - spec.effect
        patient_effect = patient_effect + shift * (time >= change_time)

    noise = rng.normal(0.0, spec.residual_sd, patient.size)
    if spec.outlier_rate > 0:
        outlier = rng.uniform(size=patient.size) < spec.outlier_rate
        noise = np.where(outlier, noise * spec.outlier_scale, noise)
    # b_i is the effect per unit of exposure: y = a_i + b_i x + γ t + ε.
    outcome = intercept[patient] + patient_effect * exposure + spec.time_trend * time + noise
    if spec.daily_amplitudes:
        outcome = outcome + true_daily_cycle(spec, 24.0 * np.mod(time, 1.0))
    time_covariate = None
    if spec.time_covariate_effect is not None:
        c = spec.time_covariate_confounding * exposure + rng.standard_normal(patient.size)
        outcome = outcome + spec.time_covariate_effect * c
        time_covariate = c[:, None]
    keep = rng.uniform(size=patient.size) >= spec.missing_rate
    events = Events(
        patient[keep],
        cohort,
        time[keep],
        exposure[keep],
        outcome[keep],
        covariates if spec.with_covariates else None,
        None if time_covariate is None else time_covariate[keep],
        names if spec.with_covariates else (),
        () if time_covariate is None else ("activity",),
        None if cluster is None else cluster[:, None],
        () if cluster is None else ("cluster",),
    )
    truth = Truth(
        intercept=intercept,
        effect=effect,
        cohort_effect=cohort_effect,
        enrolment_time=enrolment,
        population_effect=spec.effect,
        population_effect_after_change=spec.effect_after_change,
        change_time=change_time,
        covariate_names=names,
        coefficients=coefficients,
        time_covariate_effect=spec.time_covariate_effect,
        cluster_of_patient=cluster,
        cluster_effect=cluster_effect,
    )
    return Simulated(spec, events, truth)


def _patient_covariates(
    spec: ProgrammeSpec, rng: np.random.Generator, num_patients: int
) -> tuple[np.ndarray | None, tuple[str, ...], np.ndarray | None]:
    """Age and group indicators (natural units), their names and the true B."""
    modifies = (
        spec.effect_per_year or spec.intercept_per_year or spec.group_effects
    ) or spec.effect_saturation
    if not (spec.with_covariates or modifies):
        return None, (), None
    age = rng.normal(spec.age_mean, spec.age_sd, num_patients)
    levels = len(spec.group_effects) + 1
    group = rng.integers(0, levels, num_patients)
    indicators = [(group == level).astype(float) for level in range(1, levels)]
    covariates = np.stack([age, *indicators], axis=-1)
    names = ("age", *(f"group={level}" for level in range(1, levels)))
    coefficients = np.array(
        [
            [spec.intercept_per_year] + [0.0] * (levels - 1),
            [spec.effect_per_year, *spec.group_effects],
        ]
    )
    return covariates, names, coefficients


def _covariate_means(spec: ProgrammeSpec) -> np.ndarray:
    """Where the covariates are centred in the truth: mean age, group 0."""
    return np.array([spec.age_mean] + [0.0] * len(spec.group_effects))


def simulate_family(
    spec: ProgrammeSpec,
    family: Literal["bernoulli", "poisson"],
    seed: int,
    *,
    offsets: bool = False,
) -> Simulated:
    """A binary or count programme: ``simulate``'s patients, cohorts, schedule and
    true effects with spec's intercept, effect and sds on the link scale (log
    odds or log rate; the time trend, residual sd, outliers and doses are not
    used), and each reading drawn from the family with η = a_i + b_i x_it
    (Poisson: times an exposure e_it ~ U(0.5, 2) with ``offsets``, published
    as the events' offset). Deterministic given ``seed``."""
    base = simulate(spec.model_copy(update={"time_trend": 0.0, "outlier_rate": 0.0}), seed)
    events, truth = base.events, base.truth
    rng = np.random.default_rng([seed, 2])
    exposure = (events.exposure > 0).astype(float)
    eta = truth.intercept[events.patient] + truth.effect[events.patient] * exposure
    offset = rng.uniform(0.5, 2.0, eta.size) if offsets and family == "poisson" else None
    if family == "bernoulli":
        outcome = (rng.uniform(size=eta.size) < 1.0 / (1.0 + np.exp(-eta))).astype(float)
    else:
        outcome = rng.poisson(np.exp(eta) * (1.0 if offset is None else offset)).astype(float)
    replaced = Events(
        events.patient,
        events.cohort_of_patient,
        events.time,
        exposure,
        outcome,
        events.covariates,
        None,
        events.covariate_names,
        (),
        events.groups,
        events.group_names,
        offset,
    )
    return Simulated(spec, replaced, truth)


def _saturation(spec: ProgrammeSpec, age: np.ndarray) -> np.ndarray:
    """s(age), the non-linear part of the effect modifier (0 at the mean age)."""
    if not spec.effect_saturation:
        return np.zeros_like(age)
    centre, width = spec.saturation_age, spec.saturation_width
    return spec.effect_saturation * (
        np.tanh((age - centre) / width) - np.tanh((spec.age_mean - centre) / width)
    )


def true_effect_at(spec: ProgrammeSpec, age: np.ndarray) -> np.ndarray:
    """The population's expected effect of a patient of ``age`` (group 0, before
    cohort deviations): β + effect_per_year (age − age_mean) + s(age)."""
    age = np.asarray(age, dtype=float)
    return spec.effect + spec.effect_per_year * (age - spec.age_mean) + _saturation(spec, age)


def true_daily_cycle(spec: ProgrammeSpec, hour: np.ndarray) -> np.ndarray:
    """d(h): the outcome's shift at hour of day h from the day's mean."""
    hour = np.asarray(hour, dtype=float)
    return sum(
        (
            amplitude * np.cos(2.0 * np.pi * k * (hour - spec.daily_peak_hour) / 24.0)
            for k, amplitude in enumerate(spec.daily_amplitudes, start=1)
        ),
        start=np.zeros_like(hour),
    )


def joint_design(measures: int = 3) -> dict[str, np.ndarray]:
    """The first ``measures`` (1-3) of the joint model's reference design, as
    ``simulate_joint``'s keyword arguments: a glucose-like measure (effect
    −1 ± 1, residual sd 1), a lower-variance one (−0.5 ± 0.5, residual 0.5) and a
    noisy wearable-like one (2 ± 1.5, residual 3, against its effect sd 1.5: the
    weakly measured effect the correlation prior must not shrink away)."""
    if not 1 <= measures <= 3:
        raise ValueError(f"the reference design has 1-3 measures, not {measures}")
    design = {
        "effect_mean": [-1.0, -0.5, 2.0],
        "effect_sd": [1.0, 0.5, 1.5],
        "intercept_mean": [8.0, 7.0, 60.0],
        "intercept_sd": [1.0, 0.8, 5.0],
        "residual_sd": [1.0, 0.5, 3.0],
    }
    return {name: np.array(values[:measures]) for name, values in design.items()}


def simulate_joint(
    readings: np.ndarray,
    *,
    effect_mean: np.ndarray,
    effect_sd: np.ndarray,
    effect_correlation: float,
    intercept_mean: np.ndarray,
    intercept_sd: np.ndarray,
    residual_sd: np.ndarray,
    seed: int,
    cohort_of_patient: np.ndarray | None = None,
    cohort_effect_sd: np.ndarray | None = None,
) -> tuple[list[Events], np.ndarray]:
    """Several measures of the same patients (model.joint), raw units.

    readings: (P, M) number of readings of each measure per patient. Patient i's
    effects b_i ~ N(effect_mean, diag(effect_sd) R diag(effect_sd)) with R the
    equicorrelation matrix of ``effect_correlation``; intercepts a_im ~
    N(intercept_mean_m, intercept_sd_m²) independent of everything; reading t of
    measure m: y = a_im + b_im x + ε, x ~ Bernoulli(½), ε ~ N(0, residual_sd_m²),
    at a time uniform over 30 days. One cohort, or with cohort_of_patient (P,)
    and cohort_effect_sd (M,) each cohort g's effects shifted by u_gm ~
    N(0, cohort_effect_sd_m²) (independent across measures; drawn from their
    own stream, so the rest of the simulation is the same). Returns one Events
    per measure (patients indexed alike) and the true effects (P, M), cohort
    shifts included."""
    readings = np.asarray(readings, dtype=int)
    count, measures = readings.shape
    rng = np.random.default_rng([seed, 7])
    correlation = np.full((measures, measures), effect_correlation)
    np.fill_diagonal(correlation, 1.0)
    chol = np.linalg.cholesky(correlation) * np.asarray(effect_sd, dtype=float)[:, None]
    effects = np.asarray(effect_mean, dtype=float) + rng.standard_normal((count, measures)) @ chol.T
    intercepts = np.asarray(intercept_mean, dtype=float) + np.asarray(
        intercept_sd, dtype=float
    ) * rng.standard_normal((count, measures))
    cohort = np.zeros(count, dtype=int)
    if cohort_of_patient is not None:
        cohort = np.asarray(cohort_of_patient, dtype=int)
        shifts = np.asarray(cohort_effect_sd, dtype=float) * np.random.default_rng(
            [seed, 8]
        ).standard_normal((int(cohort.max()) + 1, measures))
        effects = effects + shifts[cohort]
    events = []
    for m in range(measures):
        patient = np.repeat(np.arange(count), readings[:, m])
        exposure = (rng.uniform(size=patient.size) < 0.5).astype(float)
        outcome = (
            intercepts[patient, m]
            + effects[patient, m] * exposure
            + residual_sd[m] * rng.standard_normal(patient.size)
        )
        time = rng.uniform(0.0, 30.0, patient.size)
        events.append(Events(patient, cohort, time, exposure, outcome))
    return events, effects
