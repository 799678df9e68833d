"""Posterior-predictive residuals (model.predictive) against independent references.

- Dense brute force: append one new reading to a tiny random problem, write the
  joint Gaussian of all readings explicitly (test_likelihood.dense_joint) and
  condition the new reading on the old ones: under a single draw θ the residual
  must equal (y − E[y | old]) / sd[y | old] exactly.
- Simulation ground truth: readings drawn from the model itself give residuals
  that are N(0, 1) (the probability integral transform of the true predictive
  is uniform), and a shifted stream gives residuals shifted by the shift over
  the predictive sd.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_likelihood import CASES, dense_joint, random_problem

from model.config import ModelConfig
from model.evidence import stats_from_events
from model.likelihood import Hyper, cohort_effect_posterior
from model.predictive import predictive_residuals


def _one_draw(theta: Hyper) -> Hyper:
    return jax.tree.map(lambda leaf: jnp.asarray(leaf)[None], theta)


@pytest.mark.parametrize("config", CASES, ids=["full", "no-trend", "no-cohort"])
@pytest.mark.parametrize("seed", range(10))
def test_residual_equals_dense_conditioning(config, seed):
    cohort, num_cohorts, patient, exposure, time, outcome, theta = random_problem(seed, config)
    rng = np.random.default_rng(1000 + seed)
    target = int(rng.integers(0, cohort.size))
    new_exposure, new_time = 2.5 * rng.integers(0, 2), rng.uniform(-1, 1)

    y_mean, y_cov, *_ = dense_joint(
        cohort,
        np.append(patient, target),
        np.append(exposure, new_exposure),
        np.append(time, new_time),
        theta,
        config,
    )
    old = slice(0, patient.size)
    gain = np.linalg.solve(y_cov[old, old], y_cov[old, -1]) if patient.size else np.zeros(0)
    mean = y_mean[-1] + gain @ (outcome - y_mean[old])
    sd = np.sqrt(y_cov[-1, -1] - gain @ y_cov[old, -1])
    # A reading within a few sds (far tails are clipped by design: PIT_CLIP).
    new_outcome = mean + sd * rng.uniform(-3.0, 3.0)

    stats = stats_from_events(cohort.size, patient, exposure, time, outcome, config)
    gram = jnp.asarray(stats.gram)
    u_mean, u_var = cohort_effect_posterior(theta, gram, jnp.asarray(cohort), num_cohorts, config)
    g = cohort[target]
    z = predictive_residuals(
        _one_draw(theta),
        stats.gram[[target]],
        np.asarray(u_mean)[[g]][None],
        np.asarray(u_var)[[g]][None],
        np.asarray([new_exposure]),
        np.asarray([new_time]),
        np.asarray([new_outcome]),
        config,
    )
    np.testing.assert_allclose(z, [(new_outcome - mean) / sd], rtol=1e-7, atol=1e-9)


def _simulated_stream(shift: float, seed: int = 0):
    """Patients simulated from one known θ; for each, the evidence of its first
    readings and one further reading (shifted by ``shift`` outcome units): the
    residuals of those readings."""
    draws, gram, exposure, outcome, config = _stream_inputs(shift, seed)
    zeros = np.zeros((1, gram.shape[0]))
    return predictive_residuals(
        draws, gram, zeros, zeros, exposure, np.zeros(gram.shape[0]), outcome, config
    )


def _stream_inputs(shift: float, seed: int = 0):
    """_simulated_stream's draws, each reading's patient's Gram matrix, the
    readings' exposures and outcomes, and the config."""
    config = ModelConfig(time_trend=False, cohort_level=False)
    rng = np.random.default_rng(seed)
    theta = Hyper(
        mu=jnp.asarray([0.3, -0.5]),
        tau=jnp.asarray([0.8, 0.4]),
        corr_chol=jnp.asarray([[1.0, 0.0], [0.3, np.sqrt(1 - 0.09)]]),
        tau_cohort=jnp.asarray(0.0),
        sigma=jnp.asarray(0.6),
        gamma=jnp.zeros(0),
    )
    num_patients, per_patient = 4000, 8
    chol = np.asarray(theta.covariance_chol)
    effects = np.asarray(theta.mu) + rng.normal(size=(num_patients, 2)) @ chol.T
    exposure = rng.integers(0, 2, (num_patients, per_patient + 1)).astype(float)
    outcome = (
        effects[:, :1]
        + exposure * effects[:, 1:]
        + float(theta.sigma) * rng.normal(size=exposure.shape)
    )
    outcome[:, -1] += shift
    patient = np.repeat(np.arange(num_patients), per_patient)
    time = np.zeros(patient.size)
    stats = stats_from_events(
        num_patients,
        patient,
        exposure[:, :-1].ravel(),
        time,
        outcome[:, :-1].ravel(),
        config,
    )
    return _one_draw(theta), stats.gram, exposure[:, -1], outcome[:, -1], config


def test_residuals_of_readings_from_the_model_are_standard_normal():
    z = _simulated_stream(shift=0.0)
    # 4000 independent N(0, 1): se of the mean 0.016, of the sd ≈ 0.011; 4 se.
    assert abs(z.mean()) < 0.064
    assert abs(z.std() - 1.0) < 0.045
    # Tails: P(|z| > 2) = 4.55%, binomial se 0.33% at n = 4000.
    assert abs(np.mean(np.abs(z) > 2.0) - 0.0455) < 4 * 0.0033


def test_a_shifted_stream_moves_the_residuals():
    # Predictive sd ≈ sqrt(σ² + posterior var) ≈ 0.65 here, so a shift of 0.6
    # outcome units moves z by about 0.9: far beyond the 0.016 se of the mean.
    z = _simulated_stream(shift=0.6)
    assert 0.6 < z.mean() < 1.0


def test_residuals_in_blocks_equal_one_call(monkeypatch):
    """A batch larger than RESIDUAL_BLOCK is computed in blocks (bounded memory
    and compiles): the same residuals as one call over every reading."""
    import model.predictive as predictive

    blocked = _simulated_stream(shift=0.0)
    assert blocked.size > predictive.RESIDUAL_BLOCK
    monkeypatch.setattr(predictive, "RESIDUAL_BLOCK", 1 << 20)
    whole = _simulated_stream(shift=0.0)
    np.testing.assert_allclose(blocked, whole, rtol=0, atol=1e-9)


def test_a_table_of_group_moments_equals_each_readings_own_column():
    """The conflict check's path: each reading's cohort moments gathered from
    an (S, K) table by ``columns`` (streams.scoring.MeasurePosterior.shift_table),
    over more readings than one RESIDUAL_BLOCK, give the residuals of the same
    moments given per reading (the path test_residual_equals_dense_conditioning
    checks against dense conditioning)."""
    import model.predictive as predictive

    draws, gram, exposure, outcome, config = _stream_inputs(shift=0.0)
    count = gram.shape[0]
    assert count > predictive.RESIDUAL_BLOCK
    rng = np.random.default_rng(5)
    groups = 37  # not a bucket size: the table's width is padded
    table_mean = rng.normal(0.0, 0.5, (1, groups))
    table_var = rng.uniform(0.05, 0.5, (1, groups))
    columns = rng.integers(0, groups, count)
    time = np.zeros(count)
    from_table = predictive_residuals(
        draws, gram, table_mean, table_var, exposure, time, outcome, config, columns=columns
    )
    per_reading = predictive_residuals(
        draws, gram, table_mean[:, columns], table_var[:, columns], exposure, time, outcome,
        config,
    )  # fmt: skip
    np.testing.assert_allclose(from_table, per_reading, rtol=0, atol=1e-9)
    # the moments matter: without them the residuals differ
    zeros = np.zeros((1, count))
    without = predictive_residuals(draws, gram, zeros, zeros, exposure, time, outcome, config)
    assert np.max(np.abs(without - from_table)) > 0.1
