"""Several grouping levels (issue 15 item 7): the dense group step against dense
brute force and autodiff.

Brute force (tests/test_likelihood.dense_joint): the joint Gaussian of every
observation, patient effect and every level's group effects written out, then
the marginal density of y (scipy) and conditioning on y (dense linear algebra).
Tiny random problems, random θ, float64, padding patients and padding groups.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps
from test_likelihood import assert_same_hyper, dense_joint, dense_posterior, random_problem

from model.config import ModelConfig
from model.evidence import stats_from_events
from model.likelihood import (
    _collapsed_value,
    collapsed_loglik,
    group_effect_posterior,
    patient_effects_given_theta,
    patient_shift_posterior,
)
from model.scores import level_posteriors, shift_moments_by_level

jax.config.update("jax_enable_x64", True)

CONFIGS = [
    ModelConfig(grouping_levels=("cluster",)),
    ModelConfig(grouping_levels=("cluster", "sex"), time_trend=False),
]
IDS = ["cohort×cluster", "cohort×cluster×sex"]
PAD_PATIENTS = 3
PAD_GROUPS = 2  # per level


def grouped_problem(seed: int, config: ModelConfig):
    """random_problem plus each further level's group of every patient (crossed
    with the cohorts: drawn independently) and a random τ_l per level."""
    cohort, num_cohorts, patient, exposure, time, outcome, theta = random_problem(seed, config)
    rng = np.random.default_rng(500 + seed)
    levels = []
    for _ in config.grouping_levels:
        count = int(rng.integers(1, 4))
        levels.append((rng.integers(0, count, cohort.size), count, rng.uniform(0.05, 1.5)))
    theta = theta._replace(tau_groups=jnp.asarray([sd for *_, sd in levels]))
    stats = stats_from_events(cohort.size, patient, exposure, time, outcome, config)
    return (cohort, num_cohorts, patient, exposure, time, outcome), theta, levels, stats


def padded_arguments(cohort, num_cohorts, levels, stats):
    """gram, cohort, groups, num_cohorts, num_groups with PAD_PATIENTS zero-Gram
    patients (in group 0 everywhere) and PAD_GROUPS empty groups per level."""
    gram = np.concatenate([stats.gram, np.zeros((PAD_PATIENTS, *stats.gram.shape[1:]))])
    cohorts = np.concatenate([cohort, np.zeros(PAD_PATIENTS, dtype=int)])
    groups = np.stack([group for group, *_ in levels], axis=-1)
    groups = np.concatenate([groups, np.zeros((PAD_PATIENTS, len(levels)), dtype=int)])
    num_groups = tuple(count + PAD_GROUPS for _, count, _ in levels)
    return (
        jnp.asarray(gram),
        jnp.asarray(cohorts),
        jnp.asarray(groups),
        num_cohorts + PAD_GROUPS,
        num_groups,
    )


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@pytest.mark.parametrize("seed", range(10))
def test_several_levels_equal_dense_brute_force(config, seed):
    """Value, every group effect's joint posterior and every patient effect's
    posterior equal the dense Gaussian's, to 1e-8 (float64 rounding on problems
    of ≤ 25 readings); padding patients and groups change nothing, and a padding
    group keeps its prior N(0, τ_l²)."""
    problem, theta, levels, stats = grouped_problem(seed, config)
    cohort, num_cohorts, patient, exposure, time, outcome = problem
    gram, cohorts, groups, padded_cohorts, num_groups = padded_arguments(
        cohort, num_cohorts, levels, stats
    )
    args = (gram, cohorts, padded_cohorts, config, None, groups, num_groups)
    collapsed = float(collapsed_loglik(theta, *args))
    y_mean, y_cov, latent_mean, latent_cov, cross = dense_joint(
        cohort, patient, exposure, time, theta, config, levels=levels
    )
    if patient.size:
        dense = sps.multivariate_normal(y_mean, y_cov).logpdf(outcome)
        assert abs(collapsed - dense) <= 1e-8 * max(1.0, abs(dense))
        gain = np.linalg.solve(y_cov, cross.T).T
        post_mean = latent_mean + gain @ (outcome - y_mean)
        post_cov = latent_cov - gain @ cross.T
    else:
        assert collapsed == 0.0
        post_mean, post_cov = latent_mean, latent_cov

    size = cohort.size
    shift_mean, shift_var = patient_shift_posterior(theta, *args)
    result = patient_effects_given_theta(theta, gram, shift_mean, shift_var, config)
    effect = 2 * np.arange(size) + 1
    np.testing.assert_allclose(result.mean[:size], post_mean[effect], rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(
        result.variance[:size], np.diag(post_cov)[effect], rtol=1e-8, atol=1e-9
    )

    # The groups' joint posterior: real groups as the dense one (the latent vector
    # has the cohorts, then each level's groups, after the patients), padding at the prior.
    mean, cov = (np.asarray(a) for a in group_effect_posterior(theta, *args))
    real, padding, start = [], [], 0
    for count, sd, padded in zip(
        [int(cohort.max()) + 1] + [count for _, count, _ in levels],  # as dense_joint's
        [float(theta.tau_cohort)] + [sd for *_, sd in levels],
        [padded_cohorts, *num_groups],
        strict=True,
    ):
        real.extend(range(start, start + count))
        padding.extend((g, sd) for g in range(start + count, start + padded))
        start += padded
    dense_groups = np.arange(2 * size, 2 * size + len(real))
    np.testing.assert_allclose(mean[real], post_mean[dense_groups], rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(
        cov[np.ix_(real, real)], post_cov[np.ix_(dense_groups, dense_groups)], rtol=1e-8, atol=1e-9
    )
    for g, sd in padding:
        assert mean[g] == 0.0
        assert cov[g, g] == pytest.approx(sd**2, rel=1e-12)


def dense_group_posterior(problem, theta, levels, config):
    """Brute force: the dense joint posterior (mean, covariance) of the real
    groups (cohorts, then each level's), by conditioning the joint Gaussian."""
    cohort, _, patient, exposure, time, outcome = problem
    joint = dense_joint(cohort, patient, exposure, time, theta, config, levels=levels)
    latent_mean, latent_cov = dense_posterior(outcome, *joint)
    groups = slice(2 * cohort.size, None)
    return latent_mean[groups], latent_cov[groups, groups]


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@pytest.mark.parametrize("seed", range(4))
def test_level_posteriors_give_every_shift_as_dense_conditioning(config, seed):
    """What the population posterior publishes for scoring with several levels
    (model.scores.LevelPosteriors: each group's mean and variance and the
    covariances between levels, under each draw) gives the moments of the
    total shift a_iᵀu of a patient in *any* combination of groups, as dense
    brute force does: a_iᵀ E[u] and a_iᵀ Cov[u] a_i, to 1e-8. An unseen group
    (index −1) adds its prior variance τ_l² and nothing else. Two draws of θ
    (the second with other level sds), padding patients and groups."""
    problem, theta, levels, stats = grouped_problem(seed, config)
    cohort, num_cohorts = problem[0], problem[1]
    gram, cohorts, groups, padded_cohorts, num_groups = padded_arguments(
        cohort, num_cohorts, levels, stats
    )
    second = theta._replace(tau_cohort=theta.tau_cohort * 0.5, tau_groups=theta.tau_groups * 1.7)
    draws = jax.tree.map(lambda *values: jnp.stack(values), theta, second)
    parts = level_posteriors(draws, gram, cohorts, padded_cohorts, config, None, groups, num_groups)
    counts = [int(cohort.max()) + 1] + [count for _, count, _ in levels]  # as dense_joint's
    combos = np.array(list(itertools.product(*(range(-1, count) for count in counts))))
    prior_sd = np.stack(
        [np.concatenate([[float(d.tau_cohort)], np.asarray(d.tau_groups)]) for d in (theta, second)]
    )
    mean, var = shift_moments_by_level(parts, combos, prior_sd**2)
    assert mean.shape == var.shape == (2, len(combos))
    offsets = np.concatenate([[0], np.cumsum(counts)])
    loading = np.zeros((len(combos), offsets[-1]))
    for level in range(len(counts)):
        seen = combos[:, level] >= 0
        loading[np.flatnonzero(seen), offsets[level] + combos[seen, level]] = 1.0
    for s, draw in enumerate((theta, second)):
        draw_levels = [
            (group, count, float(sd))
            for (group, count, _), sd in zip(levels, np.asarray(draw.tau_groups), strict=True)
        ]
        dense_mean, dense_cov = dense_group_posterior(problem, draw, draw_levels, config)
        unseen_var = ((combos < 0) * prior_sd[s] ** 2).sum(axis=1)
        np.testing.assert_allclose(mean[s], loading @ dense_mean, rtol=1e-8, atol=1e-9)
        np.testing.assert_allclose(
            var[s],
            np.einsum("pg,gh,ph->p", loading, dense_cov, loading) + unseen_var,
            rtol=1e-8,
            atol=1e-9,
        )


@pytest.mark.parametrize("half_life", [None, 0.7], ids=["no-forgetting", "forgetting"])
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@pytest.mark.parametrize("seed", range(6))
def test_several_levels_closed_form_gradient_equals_autodiff(config, seed, half_life):
    """collapsed_loglik's gradient (Fisher's identity, the dense group step's
    derivative in each level's sd) equals reverse-mode autodiff through the
    patient and group steps, padding included, to 1e-8 relative."""
    config = config.model_copy(update={"half_life": half_life})
    problem, theta, levels, stats = grouped_problem(seed, config)
    gram, cohorts, groups, num_cohorts, num_groups = padded_arguments(
        problem[0], problem[1], levels, stats
    )
    args = (gram, cohorts, num_cohorts, config, None, groups, num_groups)
    value, grad = jax.value_and_grad(collapsed_loglik)(theta, *args)
    expected_value, expected = jax.value_and_grad(_collapsed_value)(theta, *args)
    assert abs(float(value - expected_value)) <= 1e-10 * max(1.0, abs(float(expected_value)))
    expected = expected._replace(corr_chol=jnp.tril(expected.corr_chol))
    if problem[2].size:  # with data, the check has something to check
        assert np.any(np.abs(np.asarray(grad.tau_groups)) > 1e-6)
    assert_same_hyper(grad, expected)


def test_a_level_with_zero_sd_is_no_level():
    """τ_l = 0 (the boundary the sd's prior allows) is finite, equals the model
    without that level, and its sd's gradient is 0 there (as the one-level
    cohort step's is at τ_u = 0)."""
    config = CONFIGS[0]
    problem, theta, levels, stats = grouped_problem(4, config)
    cohort, num_cohorts = problem[0], problem[1]
    theta = theta._replace(tau_groups=jnp.zeros(1))
    gram, cohorts, groups, padded_cohorts, num_groups = padded_arguments(
        cohort, num_cohorts, levels, stats
    )
    args = (gram, cohorts, padded_cohorts, config, None, groups, num_groups)
    value, grad = jax.value_and_grad(collapsed_loglik)(theta, *args)
    single = collapsed_loglik(
        theta._replace(tau_groups=None), gram, cohorts, padded_cohorts, ModelConfig()
    )
    assert float(value) == pytest.approx(float(single), rel=1e-12)
    assert float(grad.tau_groups[0]) == 0.0
    assert np.all(np.isfinite(np.asarray(grad.tau_cohort)))


def test_missing_groups_is_an_error():
    """A model with further levels and no group indices fails loudly."""
    problem, theta, _, stats = grouped_problem(0, CONFIGS[0])
    with pytest.raises(ValueError, match="further grouping level"):
        collapsed_loglik(
            theta, jnp.asarray(stats.gram), jnp.asarray(problem[0]), problem[1], CONFIGS[0]
        )


def test_heldout_density_with_several_levels_is_the_exact_predictive_ratio():
    """Selection's held-out density with crossed levels, p(y_i | θ, train) =
    p(y_train, y_i | θ) / p(y_train | θ), against two evaluations of the
    collapsed likelihood; held-out patients in a cohort and a cluster without
    training patients included (their groups keep the prior)."""
    from model.selection import heldout_loglik

    config = CONFIGS[0]
    rng = np.random.default_rng(7)
    num_patients, num_cohorts, num_groups = 24, 4, (3,)
    cohort = rng.integers(0, 3, num_patients)
    groups = rng.integers(0, 2, (num_patients, 1))
    cohort[0], groups[1, 0] = 3, 2  # groups seen only in the held-out rows
    patient = np.repeat(np.arange(num_patients), 6)
    exposure = np.tile([0.0, 0.0, 0.0, 1.0, 1.0, 1.0], num_patients)
    time = rng.uniform(-1.0, 1.0, patient.size)
    outcome = rng.normal(0.0, 1.0, patient.size) + 0.8 * exposure * groups[patient, 0]
    stats = stats_from_events(num_patients, patient, exposure, time, outcome, config)
    *_, theta = random_problem(1, config)
    theta = theta._replace(tau_groups=jnp.asarray([0.6]))
    gram = jnp.asarray(stats.gram)
    train = np.arange(num_patients) >= 3
    index = (jnp.asarray(cohort), jnp.asarray(groups))
    got = heldout_loglik(
        jax.tree.map(lambda x: x[None], theta),
        gram[train], index[0][train], gram[:3], index[0][:3], num_cohorts, config,
        index[1][train], index[1][:3], num_groups,
    )[0]  # fmt: skip

    def loglik(rows):
        return collapsed_loglik(
            theta, gram[rows], index[0][rows], num_cohorts, config, None, index[1][rows], num_groups
        )

    base = loglik(np.flatnonzero(train))
    for i in range(3):
        joint = loglik(np.concatenate([[i], np.flatnonzero(train)]))
        assert float(got[i]) == pytest.approx(float(joint - base), abs=1e-8)


def test_choose_keeps_a_level_only_when_it_earns_its_place():
    """choose on known pointwise values: a second level that adds noise-level
    elpd to a winning one is dropped; one that adds a clear lead is kept."""
    from model.selection import choose

    rng = np.random.default_rng(0)
    n = 200
    base = rng.normal(-30.0, 3.0, n)
    cluster = base + 1.0 + rng.normal(0.0, 0.5, n)  # beats partial by far more than 2 se
    pointwise = {
        "partial": base,
        "partial+clinic": base + rng.normal(0.0, 0.05, n),
        "partial+cluster": cluster,
        "partial+clinic+cluster": cluster + 0.01 + rng.normal(0.0, 0.2, n),
    }
    assert choose(pointwise) == "partial+cluster"
    pointwise["partial+clinic+cluster"] = cluster + 0.5 + rng.normal(0.0, 0.2, n)
    assert choose(pointwise) == "partial+clinic+cluster"


@pytest.mark.slow
def test_selection_chooses_the_level_that_matters():
    """Clinics × genotype clusters, simulated: clusters shift the effect (sd 4 bpm
    against a between-patient sd of 1), clinics do not. 5-fold CV over held-out
    patients must choose the cluster level alone: it beats partial pooling by far
    more than 2 se (test_selection's cohort case, with 5 groups instead of 8),
    while adding the clinics fits noise (their elpd gain stays within 2 se)."""
    from model.offline import model_config_for
    from model.selection import select_structure
    from model.simulate import ProgrammeSpec, simulate

    spec = ProgrammeSpec(
        num_patients=160, num_cohorts=8, obs_per_patient=10, baseline_fraction=0.5,
        effect_sd=1.0, residual_sd=4.0, cohort_effect_sd=0.0, num_clusters=5,
        cluster_effect_sd=4.0,
    )  # fmt: skip
    events = simulate(spec, seed=21).events
    config = model_config_for(events, time_trend=True, cohort_level=False)
    stats = stats_from_events(
        events.num_patients, events.patient, events.exposure, events.time, events.outcome, config
    )
    structures = ["partial", "partial+clinic", "partial+cluster", "partial+clinic+cluster"]
    result = select_structure(
        lambda _config: stats,
        config,
        {"clinic": events.cohort_of_patient, "cluster": events.groups[:, 0]},
        only=structures,
    )
    rows = {row["structure"]: row for row in result["table"]}
    print(result["table"])
    assert set(rows) == set(structures)
    assert -rows["partial"]["elpd_diff"] > 2.0 * rows["partial"]["diff_se"]
    assert result["choice"] == "partial+cluster", result["table"]


@pytest.mark.slow
def test_nuts_fit_reports_every_levels_sd():
    """fit_programme with method="nuts" on a crossed programme: the reference
    samples every level's sd and reports it under ``levels`` (no group effects),
    the same names as the SVI fit; a short run (the numbers are the fidelity
    tests' business, here only the plumbing)."""
    from model.config import MeasureConfig
    from model.offline import fit_programme
    from model.simulate import ProgrammeSpec, simulate

    spec = ProgrammeSpec(
        num_patients=40, num_cohorts=3, obs_per_patient=8, num_clusters=3, cluster_effect_sd=2.0
    )
    events = simulate(spec, seed=5).events
    measure = MeasureConfig(name="rhr", unit="bpm", direction="lower", mcid=2.0)
    result, _ = fit_programme(
        events, measure, method="nuts", nuts_options={"num_warmup": 100, "num_samples": 100}
    )
    assert [level["level"] for level in result["levels"]] == ["cohort", "cluster"]
    assert result["levels"][0]["effect_sd"] == result["population"]["effect_sd_cohorts"]
    cluster = result["levels"][1]
    assert cluster["groups"] == [] and 0.0 < cluster["effect_sd"]["mean"] < 20.0
