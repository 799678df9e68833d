"""Offline fit of a whole programme: the engine behind ``efficacy fit``.

Arrays in (model.events.Events), a JSON-ready dict out. Two methods:

- ``svi``: the streaming method run once: collapsed likelihood, full-rank SVI
  over θ, patient posteriors as mixtures over draws of θ (model.population,
  model.scores).
- ``nuts``: the reference, the same model not collapsed, fitted by NUTS
  (model.reference); slower, for validation and small analyses.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import jax
import numpy as np

from model.config import DecisionRule, MeasureConfig, ModelConfig, Standardization, SVIConfig
from model.events import Events
from model.evidence import empty_stats, events_stats
from model.exported import ExportCache, through
from model.families import Family, cell_stats
from model.family_scores import population_effect_on_scale, summarize_family_effects
from model.population import PopulationFitter, pad_evidence
from model.scores import (
    EffectSummary,
    classify,
    cohort_posteriors,
    describe,
    group_posteriors,
    mixture_quantiles,
    summarize_effects,
)
from model.smooth import SmoothDesign, curve_summaries, spline_blocks

Method = Literal["svi", "nuts"]
SUMMARY_DRAWS = 4000
POPULATION_NAMES = (
    "effect",
    "intercept",
    "sigma",
    "effect_sd_patients",
    "effect_sd_cohorts",
    "time_trend",
)


COHORT_PROBS = np.array([0.05, 0.95])
_mixture_quantiles = jax.jit(mixture_quantiles)


@jax.jit
def _fit_keys(seed: jax.Array) -> tuple[jax.Array, ...]:
    """The fit's four keys (init, steps, draws, summary draws) from its seed: one
    compiled call (split and unpacked eagerly, they were four)."""
    return tuple(jax.random.split(jax.random.PRNGKey(seed), 4))


def cohort_effects(
    effect: np.ndarray,
    cohort_mean: np.ndarray,
    cohort_var: np.ndarray,
    std: Standardization,
    export_cache: ExportCache | None = None,
) -> list[dict[str, float]]:
    """Every cohort's effect (the population effect plus the cohort's deviation)
    in raw units: under draw s of θ it is N(effect[s] + cohort_mean[s, g],
    cohort_var[s, g]) in standardised units, so its posterior is that mixture:
    exact mean and sd, 5% and 95% quantiles by model.scores.mixture_quantiles.
    effect (S,), cohort_mean and cohort_var (S, G); one dict per cohort."""
    means = np.asarray(effect, dtype=float)[:, None] + np.asarray(cohort_mean, dtype=float)
    variances = np.maximum(np.asarray(cohort_var, dtype=float), 1e-24)
    sds = np.sqrt(variances)
    quantiles = np.asarray(
        through(export_cache, "offline.mixture_quantiles", _mixture_quantiles)(
            jax.device_put(means), jax.device_put(sds), COHORT_PROBS
        )
    )
    mean = means.mean(axis=0)
    sd = np.sqrt(np.mean(variances + (means - mean) ** 2, axis=0))
    scale = float(std.effect_to_raw(1.0))  # > 0: quantiles map to quantiles
    return [
        {
            "mean": float(mean[g] * scale),
            "sd": float(sd[g] * scale),
            "q05": float(quantiles[0, g] * scale),
            "q95": float(quantiles[1, g] * scale),
        }
        for g in range(means.shape[1])
    ]


def model_config_for(
    events: Events,
    *,
    time_trend: bool,
    cohort_level: bool,
    family: Family = "gaussian",
) -> ModelConfig:
    """Model structure and data-derived standardisation for an offline fit,
    with the events' covariate columns and, with a cohort level, their further
    grouping levels (named as the events name them). A Bernoulli or Poisson
    outcome is not standardised (its link scale is the model's)."""
    if family == "gaussian":
        std = Standardization.from_data(
            events.outcome, events.exposure, events.time if time_trend else None
        )
    else:
        std = Standardization()
    std = std.with_covariates(events.covariates, events.time_covariates)
    names = _names(events.covariates, events.covariate_names, "x")
    if spline_blocks(names):  # a spline's columns keep their scale: Σ u² = ∫ f''²
        penalised = {k for block in spline_blocks(names).values() for k in block}
        std = std.model_copy(
            update={
                "covariate_scale": tuple(
                    1.0 if k in penalised else scale for k, scale in enumerate(std.covariate_scale)
                )
            }
        )
    return ModelConfig(
        family=family,
        time_trend=time_trend,
        cohort_level=cohort_level,
        grouping_levels=events.grouping_levels if cohort_level else (),
        covariates=names,
        time_covariates=_names(events.time_covariates, events.time_covariate_names, "c"),
        standardization=std,
    )


def _names(values: np.ndarray | None, names: tuple[str, ...], prefix: str) -> tuple[str, ...]:
    count = 0 if values is None else int(np.shape(values)[1])
    if names and len(names) != count:
        raise ValueError(f"{len(names)} names for {count} covariate columns")
    return tuple(names) or tuple(f"{prefix}{k + 1}" for k in range(count))


def coefficient_summaries(
    population: dict[str, np.ndarray | None], config: ModelConfig
) -> dict[str, list[dict[str, Any]]]:
    """The covariates' coefficients, natural units, as JSON-ready summaries:
    ``coefficients`` (per patient covariate: its shift of the patient's expected
    effect per covariate unit, the effect modifier, and of the intercept) and
    ``time_coefficients`` (per time-varying covariate: its shift of the outcome
    per unit). Empty lists when the model has none."""
    coefficients = population.get("coefficients")
    time_coefficients = population.get("time_coefficients")
    return {
        "coefficients": [
            {
                "covariate": name,
                "effect": describe(coefficients[:, 1, k]),
                "intercept": describe(coefficients[:, 0, k]),
            }
            for k, name in enumerate(config.covariates)
        ],
        "time_coefficients": [
            {"covariate": name, **describe(time_coefficients[:, k])}
            for k, name in enumerate(config.time_covariates)
        ],
    }


def population_quantities(
    draws, config: ModelConfig, measure: MeasureConfig | None = None
) -> dict[str, np.ndarray | None]:
    """Population quantities in raw units from draws of θ.

    The intercept is reported at exposure 0 and raw time 0 (undoing the time
    centring: a(0) = a(t̄) − γ t̄). For a Bernoulli or Poisson measure the
    effect is on the measure's effect scale (model.family_scores), the
    intercept and the sds on the link scale (log odds, log rate), and there is
    no σ.
    """
    std = config.standardization
    if config.family != "gaussian":
        from model.family_scores import default_scale

        scale = (measure.effect_scale if measure else None) or default_scale(config.family)
        gaussian = population_quantities(draws, config.model_copy(update={"family": "gaussian"}))
        return {
            **gaussian,
            "effect": population_effect_on_scale(draws, scale, config.family),
            "sigma": None,
        }
    mu = np.asarray(draws.mu)
    intercept = mu[:, 0]
    trend = None
    if config.time_trend:
        gamma = np.asarray(draws.gamma)[:, 0]
        intercept = intercept - gamma * std.time_location / std.time_scale
        trend = std.trend_to_raw(gamma)
    return {
        "effect": std.effect_to_raw(mu[:, 1]),
        "intercept": std.intercept_to_raw(intercept),
        "sigma": np.asarray(draws.sigma) * std.outcome_scale,
        "effect_sd_patients": std.effect_to_raw(np.asarray(draws.tau)[:, 1]),
        "effect_sd_cohorts": (
            std.effect_to_raw(np.asarray(draws.tau_cohort)) if config.cohort_level else None
        ),
        "effect_sd_groups": (  # (S, L): the further grouping levels'
            std.effect_to_raw(np.asarray(draws.tau_groups)) if config.grouping_levels else None
        ),
        "time_trend": trend,
        "coefficients": (
            std.coefficients_to_raw(np.asarray(draws.coef)) if config.num_covariates else None
        ),
        "time_coefficients": (
            std.time_coefficients_to_raw(np.asarray(draws.gamma)[:, int(config.time_trend) :])
            if config.time_covariates
            else None
        ),
    }


def _patients_from_samples(
    effect_samples: np.ndarray, population_effect: np.ndarray, measure: MeasureConfig
) -> EffectSummary:
    """Per-patient summaries from posterior samples (S, P) of the effects (NUTS)."""
    benefit = measure.benefit_sign * effect_samples
    mean = effect_samples.mean(axis=0)
    population = np.full_like(mean, population_effect.mean())
    return EffectSummary(
        mean=mean,
        sd=effect_samples.std(axis=0, ddof=1),
        lower=np.quantile(effect_samples, 0.05, axis=0),
        upper=np.quantile(effect_samples, 0.95, axis=0),
        p_benefit_ge_mcid=(benefit >= measure.mcid).mean(axis=0),
        p_benefit_gt_0=(benefit > 0).mean(axis=0),
        population_effect=population,
        cohort_deviation=np.full_like(mean, np.nan),
        individual_deviation=np.full_like(mean, np.nan),
        shrinkage=np.full_like(mean, np.nan),
    )


def fit_programme(
    events: Events,
    measure: MeasureConfig,
    *,
    method: Method = "svi",
    seed: int = 0,
    time_trend: bool = True,
    cohort_level: bool = True,
    rule: DecisionRule | None = None,
    svi_config: SVIConfig | None = None,
    nuts_options: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
    export_cache: ExportCache | None = None,
    smooth: SmoothDesign | None = None,
) -> tuple[dict[str, Any], EffectSummary]:
    """Fit the hierarchical model to all events at once.

    ``smooth``: the events with smooth terms added (model.smooth.add_smooth_terms;
    ``events`` is then ignored); the result gets their ``curves`` and
    ``daily_cycle`` (mean and 90% band over a grid, natural units).

    With ``events.covariates`` the patients' expected intercept and effect
    depend on them (model.likelihood); with ``events.time_covariates`` they are
    population fixed effects. Their coefficients are reported in natural units.

    With ``events.groups`` (and a cohort level) every further grouping level
    carries its own effect deviations, crossed with the cohorts; ``levels``
    reports each level's sd and groups' effects (SVI; the sd alone with NUTS).

    ``export_cache`` (SVI): where the traced programs are kept across processes,
    so a later fit of the same shapes neither traces nor lowers (model.exported).

    Returns the JSON-ready result (population, patients by index, diagnostics)
    and the per-patient EffectSummary arrays (raw units). Patient, cohort and
    group labels (and the cohort level's name) are attached by the caller, who
    knows them.
    """
    rule = rule or DecisionRule()
    if smooth is not None:
        events = smooth.events
    cohorts: list[dict[str, float]] = []
    group_effects: list[list[dict[str, float]]] = []
    say = progress or (lambda _message: None)
    family = measure.family
    if family != "gaussian" and (time_trend or events.time_covariates is not None):
        raise ValueError(
            f"a {family} measure has no time trend or time-varying covariates: fit it without them"
        )
    config = model_config_for(
        events, time_trend=time_trend, cohort_level=cohort_level, family=family
    )
    if smooth is not None:  # the curves are drawn through the knots of these bases
        config = config.model_copy(update={"splines": smooth.splines})
    if family == "gaussian":
        stats = events_stats(events, config)
    else:  # cell statistics in place of the Gram matrices (model.families)
        cells = cell_stats(
            events.num_patients,
            events.patient,
            events.exposure,
            events.outcome,
            family,
            events.offset,
        )
        gaussian_like = empty_stats(events.num_patients, config)
        exposed = np.bincount(events.patient[events.exposure != 0], minlength=events.num_patients)
        total = np.bincount(events.patient, minlength=events.num_patients)
        stats = gaussian_like._replace(
            gram=cells, count_exposed=exposed, count_unexposed=total - exposed
        )
    covariates = (
        config.standardization.covariates(events.covariates) if config.num_covariates else None
    )
    started = time.perf_counter()
    diagnostics: dict[str, Any] = {
        "method": method,
        "num_patients": events.num_patients,
        "num_cohorts": events.num_cohorts,
        "num_observations": int(events.patient.size),
        "time_trend": time_trend,
        "cohort_level": cohort_level,
        "grouping_levels": list(config.grouping_levels),
        "num_groups": list(events.num_groups) if config.grouping_levels else [],
        "covariates": list(config.covariates),
        "time_covariates": list(config.time_covariates),
        "family": family,
        "seed": seed,
    }
    if method == "svi":
        svi_config = svi_config or SVIConfig()
        groups = events.groups if config.grouping_levels else None
        evidence = pad_evidence(
            stats,
            events.cohort_of_patient,
            events.num_cohorts,
            covariates,
            groups,
            events.num_groups if config.grouping_levels else (),
        )
        fitter = PopulationFitter(config, svi_config, export_cache)
        key_init, key_fit, key_draws, key_summary = through(
            export_cache, "offline.fit_keys", _fit_keys
        )(np.int64(seed))
        state = fitter.init(key_init, evidence)

        def report(done: int, total: int, elbo: float) -> None:
            if done % 250 == 0 or done == total:
                say(f"SVI step {done}/{total}  ELBO {elbo:,.2f}")

        state, info = fitter.update(state, evidence, key_fit, progress=report)
        draws = fitter.draws(state, key_draws)
        if family == "gaussian":
            summarize = partial(summarize_effects, export_cache=export_cache)
        else:  # not exported: its Laplace step is traced per run
            summarize = summarize_family_effects
        summary = summarize(
            draws,
            stats.gram,
            events.cohort_of_patient,
            evidence.num_cohorts,
            measure,
            config,
            covariates=covariates,
            groups=groups,
            num_groups=evidence.num_groups,
        )
        population = population_quantities(
            fitter.draws(state, key_summary, SUMMARY_DRAWS), config, measure
        )
        data = (  # every patient's evidence, unpadded, as the group posteriors take it
            draws,
            jax.device_put(np.asarray(stats.gram)),  # jnp.asarray would compile per shape
            jax.device_put(np.asarray(events.cohort_of_patient, dtype=np.int32)),
            evidence.num_cohorts,
            config.structure,
            None if covariates is None else jax.device_put(np.asarray(covariates)),
        )
        if family != "gaussian":
            pass  # groups' effects are listed for Gaussian measures only
        elif config.grouping_levels:
            g_mean, g_var = (
                np.asarray(moment)
                for moment in through(
                    export_cache,
                    "scores.group_posteriors",
                    partial(
                        group_posteriors,
                        num_cohorts=evidence.num_cohorts,
                        config=config.structure,
                        num_groups=evidence.num_groups,
                    ),
                    (evidence.num_cohorts, config.structure, evidence.num_groups),
                )(
                    *data[:3],
                    covariates=data[5],
                    groups=jax.device_put(np.asarray(groups, dtype=np.int32)),
                )
            )
            start = 0
            for real, padded in zip(
                (events.num_cohorts, *events.num_groups),
                (evidence.num_cohorts, *evidence.num_groups),
                strict=True,
            ):
                block = slice(start, start + real)
                group_effects.append(
                    cohort_effects(
                        np.asarray(draws.mu)[:, 1],
                        g_mean[:, block],
                        g_var[:, block],
                        config.standardization,
                        export_cache,
                    )
                )
                start += padded
            cohorts = group_effects[0]
        elif cohort_level:
            u_mean, u_var = through(
                export_cache,
                "scores.cohort_posteriors",
                partial(
                    cohort_posteriors, num_cohorts=evidence.num_cohorts, config=config.structure
                ),
                (evidence.num_cohorts, config.structure),
            )(*data[:3], covariates=data[5])
            cohorts = cohort_effects(
                np.asarray(draws.mu)[:, 1],
                np.asarray(u_mean)[:, : events.num_cohorts],
                np.asarray(u_var)[:, : events.num_cohorts],
                config.standardization,
                export_cache,
            )
        diagnostics.update(
            elbo=info.elbo,
            elbo_se=info.elbo_se,
            svi_steps=info.steps,
            converged=info.converged,
            num_draws=svi_config.num_draws,
        )
    elif method == "nuts":
        from model.reference import fit_nuts  # heavy; only when asked for

        if family != "gaussian":
            raise ValueError(
                f"method 'nuts' summarises Gaussian measures only; for a {family} measure "
                "use 'svi' (model.reference.fit_nuts samples the model itself)"
            )
        say("running NUTS on the full (non-collapsed) model")
        reference = fit_nuts(events, config, seed=seed, **(nuts_options or {}))
        # Terms the model does not have are reported as None, as the SVI path does.
        population = {name: reference.population.get(name) for name in POPULATION_NAMES}
        for name in ("coefficients", "time_coefficients", "effect_sd_groups"):
            population[name] = reference.population.get(name)
        summary = _patients_from_samples(reference.patient_effect, population["effect"], measure)
        diagnostics.update(reference.diagnostics)
    else:
        raise ValueError(f"unknown method {method!r}: use 'svi' or 'nuts'")
    diagnostics["seconds"] = round(time.perf_counter() - started, 3)

    classification = classify(
        summary.p_benefit_ge_mcid,
        summary.p_benefit_gt_0,
        stats.count_exposed,
        stats.count_unexposed,
        rule,
    )
    patients = [
        {
            "effect": {
                "mean": float(summary.mean[i]),
                "sd": float(summary.sd[i]),
                "q05": float(summary.lower[i]),
                "q95": float(summary.upper[i]),
            },
            "p_benefit_ge_mcid": float(summary.p_benefit_ge_mcid[i]),
            "p_benefit_gt_0": float(summary.p_benefit_gt_0[i]),
            "classification": str(classification[i]),
            "observations": int(stats.count_exposed[i] + stats.count_unexposed[i]),
        }
        for i in range(events.num_patients)
    ]
    result = {
        "measure": measure.model_dump(mode="json"),
        "population": {name: describe(population[name]) for name in POPULATION_NAMES},
        **coefficient_summaries(population, config),
        "patients": patients,
        "diagnostics": diagnostics,
    }
    if smooth is not None:
        result.update(curve_summaries(population, config, population["effect"]))
    if cohorts:  # by cohort index; the caller attaches the labels
        result["cohorts"] = [{"cohort": str(g), "effect": c} for g, c in enumerate(cohorts)]
    if config.grouping_levels:
        result["levels"] = level_summaries(population, config, group_effects)
    return result, summary


def level_summaries(
    population: dict[str, np.ndarray | None],
    config: ModelConfig,
    group_effects: list[list[dict[str, float]]],
) -> list[dict[str, Any]]:
    """Every grouping level (the cohorts, named "cohort", then each further one):
    its effect sd and, where computed (SVI), each group's effect by index; the
    caller attaches names and labels."""
    sds = [population["effect_sd_cohorts"]]
    sds.extend(population["effect_sd_groups"][:, k] for k in range(len(config.grouping_levels)))
    return [
        {
            "level": name,
            "effect_sd": describe(sd),
            "groups": [
                {"group": str(g), "effect": effect}
                for g, effect in enumerate(group_effects[level] if group_effects else [])
            ],
        }
        for level, (name, sd) in enumerate(
            zip(("cohort", *config.grouping_levels), sds, strict=True)
        )
    ]
