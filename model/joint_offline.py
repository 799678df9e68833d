"""Offline fit of several measures jointly (model.joint): the engine behind
``efficacy fit --joint``.

Arrays in (one model.events.Events per measure, patients indexed alike), a
JSON-ready dict out: each measure's population quantities (raw units, as
model.offline reports a single measure's), the between-measure correlation of
the patients' effects, and every patient's effect on every measure and latent
responsiveness (model.joint's docstring defines it).
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
    describe_correlation,
    fit_joint,
    joint_config_for,
    joint_grams,
    joint_patients,
)
from model.likelihood import Hyper
from model.offline import SUMMARY_DRAWS, describe, population_quantities

MEASURE_POPULATION = ("effect", "intercept", "sigma", "effect_sd_patients", "time_trend")


def measure_draws(draws: JointHyper, m: int) -> Hyper:
    """Measure m's part of the draws of θ as a single measure's Hyper (its
    (intercept, effect) sds; the correlation factor is not part of it)."""
    tau = draws.tau[:, 2 * m : 2 * m + 2]
    return Hyper(
        mu=draws.mu[:, m],
        tau=tau,
        corr_chol=jnp.broadcast_to(jnp.eye(2), (*tau.shape, 2)),
        tau_cohort=jnp.zeros(tau.shape[0]),
        sigma=draws.sigma[:, m],
        gamma=draws.gamma[:, m],
    )


def fit_joint_programme(
    events: list[Events],
    measures: list[MeasureConfig],
    *,
    time_trend: bool = False,
    seed: int = 0,
    svi_config: SVIConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Fit the joint model to every measure's events; the result by measure and
    patient index (the caller attaches patient labels)."""
    say = progress or (lambda _message: None)
    svi_config = svi_config or SVIConfig()
    config: JointConfig = joint_config_for(events, time_trend=time_trend)
    gram = joint_grams(events, config)
    started = time.perf_counter()
    say(f"fitting {len(measures)} measures jointly, {gram.shape[0]} patients, SVI")
    draws, info, fitter, state = fit_joint(gram, config, svi_config, seed)
    summary_draws = fitter.draws(state, jax.random.PRNGKey(seed + 1), SUMMARY_DRAWS)
    signs = np.array([measure.benefit_sign for measure in measures])
    patients = joint_patients(draws, gram, config, signs)

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
            }
        )
    raw = [
        float(model_config.standardization.effect_to_raw(1.0)) for model_config in config.measures
    ]  # > 0: quantiles map to quantiles
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
        "patients": records,
        "diagnostics": {
            "method": "svi",
            "model": "joint",
            "num_patients": int(gram.shape[0]),
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
