"""Sequential variational fit: compiles once per padded shape, warm-starts, converges."""

from __future__ import annotations

import jax
import numpy as np

from model.config import ModelConfig, Standardization, SVIConfig
from model.evidence import stats_from_events
from model.population import PopulationFitter, pad_evidence

jax.config.update("jax_enable_x64", True)


def small_programme(num_patients: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    cohort = rng.integers(0, 3, num_patients)
    patient = np.repeat(np.arange(num_patients), 12)
    time = np.tile(np.arange(12.0), num_patients)
    exposure = (time >= 6).astype(float)
    effect = -1.0 + rng.normal(0.0, 0.5, num_patients)
    outcome = rng.normal(0.0, 1.0, num_patients)[patient] + effect[patient] * exposure
    outcome = outcome + rng.normal(0.0, 0.5, patient.size)
    return cohort, patient, exposure, time, outcome


def test_updates_compile_once_per_padded_shape():
    config = ModelConfig(standardization=Standardization(time_scale=10.0))
    fitter = PopulationFitter(config, SVIConfig(fresh_steps=50, update_steps=50, num_particles=1))
    cohort, patient, exposure, time, outcome = small_programme(40)
    state = None
    for num_patients in (20, 30, 40):  # all pad to the same 64-patient bucket
        rows = patient < num_patients
        stats = stats_from_events(
            num_patients, patient[rows], exposure[rows], time[rows], outcome[rows], config
        )
        evidence = pad_evidence(stats, cohort[:num_patients], 3)
        if state is None:
            state = fitter.init(jax.random.PRNGKey(0), evidence)
        state, info = fitter.update(state, evidence, jax.random.PRNGKey(num_patients))
        assert np.isfinite(info.elbo)
    # one trace for the fresh-fit schedule, one for the warm-update schedule
    assert fitter.trace_count == 2
    assert state.version == 3


def test_warm_update_starts_where_the_last_one_stopped():
    """With a vanishing learning rate the update cannot move, so its ELBO must equal
    the converged fit's ELBO: the state really carries the variational parameters."""
    config = ModelConfig(standardization=Standardization(time_scale=10.0))
    cohort, patient, exposure, time, outcome = small_programme(40, seed=1)
    stats = stats_from_events(40, patient, exposure, time, outcome, config)
    evidence = pad_evidence(stats, cohort, 3)
    fitter = PopulationFitter(config, SVIConfig(fresh_steps=1500, update_steps=50, num_particles=4))
    state, fresh = fitter.update(
        fitter.init(jax.random.PRNGKey(0), evidence), evidence, jax.random.PRNGKey(1)
    )
    frozen = PopulationFitter(
        config, SVIConfig(fresh_steps=1500, update_steps=50, num_particles=4, learning_rate=1e-9)
    )
    frozen.init(jax.random.PRNGKey(0), evidence)
    _, warm = frozen.update(state, evidence, jax.random.PRNGKey(2))
    assert abs(warm.elbo - fresh.elbo) < 4 * (warm.elbo_se + fresh.elbo_se)
    # A cold start from the initial values is far worse than the warm start.
    cold_state = frozen.init(jax.random.PRNGKey(0), evidence)
    _, cold = frozen.update(cold_state._replace(total_steps=1), evidence, jax.random.PRNGKey(2))
    assert cold.elbo < warm.elbo - 10.0
