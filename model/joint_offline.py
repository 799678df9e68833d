"""Offline fit of several measures jointly (model.joint): the engine behind
``efficacy fit --joint``.

Arrays in (one model.events.Events per measure, patients indexed alike), a
JSON-ready dict out: each measure's population quantities (raw units, as
model.offline reports a single measure's), the between-measure correlation of
the patients' effects and their common factor (loadings and variance share),
and every patient's effect on every measure and latent
responsiveness (model.joint's docstring defines it). With a cohort level, each
measure's between-cohort sd τ_u and every cohort's shift u_g of each measure's
effect; the patients' effects then include their cohort's shift.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from model.config import MeasureConfig, SVIConfig
from model.events import Events
from model.joint import (
    JointConfig,
    JointHyper,
    cohort_posteriors,
    describe_common_factor,
    describe_correlation,
    fit_joint,
    joint_cohorts,
    joint_config_for,
    joint_grams,
    joint_patients,
)
from model.likelihood import Hyper
from model.offline import SUMMARY_DRAWS, cohort_effects, population_quantities
from model.scores import describe

MEASURE_POPULATION = ("effect", "intercept", "sigma", "effect_sd_patients", "time_trend")


def measure_draws(draws: JointHyper, m: int) -> Hyper:
    """Measure m's part of the draws of θ as a single measure's Hyper (its
    (intercept, effect) sds and its τ_u; the correlation factor is not part of it)."""
    tau = draws.tau[:, 2 * m : 2 * m + 2]
    tau_cohort = draws.tau_cohort
    return Hyper(
        mu=draws.mu[:, m],
        tau=tau,
        corr_chol=jnp.broadcast_to(jnp.eye(2), (*tau.shape, 2)),
        tau_cohort=jnp.zeros(tau.shape[0]) if tau_cohort is None else tau_cohort[:, m],
        sigma=draws.sigma[:, m],
        gamma=draws.gamma[:, m],
    )


def fit_joint_programme(
    events: list[Events],
    measures: list[MeasureConfig],
    *,
    time_trend: bool = False,
    cohort_level: bool = False,
    seed: int = 0,
    svi_config: SVIConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Fit the joint model to every measure's events; the result by measure,
    cohort and patient index (the caller attaches patient and cohort labels).
    ``cohort_level``: the events' cohorts (their cohort_of_patient, alike for
    every measure) each shift every measure's effect (model.joint); the result
    then has each measure's ``effect_sd_cohorts`` (τ_u) and ``cohorts``, every
    cohort's ``effect_shift`` per measure (u_g, raw units: the mixture over the
    draws of θ of its posterior given θ, as model.offline.cohort_effects) and
    its ``effect`` (the population effect plus the shift), and the patients'
    effects include their cohort's shift."""
    say = progress or (lambda _message: None)
    svi_config = svi_config or SVIConfig()
    config: JointConfig = joint_config_for(events, time_trend=time_trend, cohort_level=cohort_level)
    gram = joint_grams(events, config)
    cohort, num_cohorts = joint_cohorts(events) if cohort_level else (None, 1)
    started = time.perf_counter()
    level = f", a cohort level over {num_cohorts} cohorts" if cohort_level else ""
    say(f"fitting {len(measures)} measures jointly, {gram.shape[0]} patients{level}, SVI")
    draws, info, fitter, state = fit_joint(
        gram, config, svi_config, seed, cohort=cohort, num_cohorts=num_cohorts
    )
    summary_draws = fitter.draws(state, jax.random.PRNGKey(seed + 1), SUMMARY_DRAWS)
    signs = np.array([measure.benefit_sign for measure in measures])
    moments = None
    if cohort_level:  # every cohort's u_g given each draw of θ, from all the evidence
        moments = tuple(
            np.asarray(part)
            for part in cohort_posteriors(
                draws, jnp.asarray(gram), jnp.asarray(cohort), num_cohorts, config.structure
            )
        )
    patients = joint_patients(
        draws, gram, config, signs, cohort=cohort, num_cohorts=num_cohorts, cohort_moments=moments
    )

    names = [measure.name for measure in measures]
    population = []
    for m, (measure, model_config) in enumerate(zip(measures, config.measures, strict=True)):
        quantities = population_quantities(measure_draws(summary_draws, m), model_config)
        population.append(
            {
                "measure": measure.name,
                "unit": measure.unit,
                "direction": measure.direction,
                **{name: describe(quantities[name]) for name in MEASURE_POPULATION},
                **(
                    {"effect_sd_cohorts": describe(quantities["effect_sd_cohorts"])}
                    if cohort_level
                    else {}
                ),
            }
        )
    raw = [
        float(model_config.standardization.effect_to_raw(1.0)) for model_config in config.measures
    ]  # > 0: quantiles map to quantiles
    cohorts = []
    if moments is not None:
        mean, cov = moments
        population_effect = np.asarray(draws.mu)[:, :, 1]  # (S, M), the draws of the moments
        # Per measure, one dict per cohort: the mixture over the draws of u_gm's
        # posterior given θ (its shift), and of μ_bm + u_gm (its effect, as a
        # single-measure fit's cohorts report: well identified where the shift
        # alone shares μ's uncertainty).
        shifts, effects = (
            [
                cohort_effects(base[:, m], mean[..., m], cov[..., m, m], model.standardization)
                for m, model in enumerate(config.measures)
            ]
            for base in (np.zeros_like(population_effect), population_effect)
        )
        cohorts = [
            {
                "cohort": str(g),
                "effect": {name: effects[m][g] for m, name in enumerate(names)},
                "effect_shift": {name: shifts[m][g] for m, name in enumerate(names)},
            }
            for g in range(num_cohorts)
        ]
    counts = np.stack(
        [np.bincount(each.patient, minlength=gram.shape[0]) for each in events], axis=-1
    )
    records = []
    for i in range(gram.shape[0]):
        effects = {
            name: {
                "mean": float(patients.effect_mean[i, m] * raw[m]),
                "sd": float(patients.effect_sd[i, m] * raw[m]),
                "q05": float(patients.effect_lower[i, m] * raw[m]),
                "q95": float(patients.effect_upper[i, m] * raw[m]),
                "observations": int(counts[i, m]),
            }
            for m, name in enumerate(names)
        }
        records.append(
            {
                "effects": effects,
                "responsiveness": {
                    "mean": float(patients.responsiveness_mean[i]),
                    "sd": float(patients.responsiveness_sd[i]),
                    "q05": float(patients.responsiveness_lower[i]),
                    "q95": float(patients.responsiveness_upper[i]),
                    "p_above_population": float(patients.p_above_population[i]),
                },
            }
        )
    return {
        "measures": population,
        "effect_correlation": {"measures": names, **describe_correlation(summary_draws)},
        "effect_factor": {"measures": names, **describe_common_factor(summary_draws, signs)},
        **({"cohorts": cohorts} if cohort_level else {}),
        "patients": records,
        "diagnostics": {
            "method": "svi",
            "model": "joint",
            "num_patients": int(gram.shape[0]),
            "cohort_level": cohort_level,
            "num_cohorts": num_cohorts,
            "num_observations": {
                name: int(each.patient.size) for name, each in zip(names, events, strict=True)
            },
            "time_trend": time_trend,
            "seed": seed,
            "elbo": info.elbo,
            "elbo_se": info.elbo_se,
            "svi_steps": info.steps,
            "converged": info.converged,
            "num_draws": svi_config.num_draws,
            "seconds": round(time.perf_counter() - started, 3),
        },
    }
