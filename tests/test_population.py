"""Sequential variational fit: compiles once per padded shape, warm-starts, converges."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from numpyro import handlers
from numpyro.infer import Trace_ELBO
from numpyro.infer.autoguide import AutoMultivariateNormal
from numpyro.infer.initialization import init_to_value

from model.config import ModelConfig, Standardization, SVIConfig
from model.evidence import stats_from_events
from model.population import (
    OrderedTraceELBO,
    PopulationFitter,
    _initial_values,
    hyper_model,
    pad_evidence,
)

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


def converged_and_frozen(seed: int):
    """A converged fresh fit of a small programme (evidence, fitter, state,
    UpdateInfo) and a second fitter of the same model whose learning rate is so
    small that an update cannot move q."""
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
    return evidence, fitter, state, fresh, frozen


def test_warm_update_starts_where_the_last_one_stopped():
    """With a vanishing learning rate the update cannot move, so its ELBO must equal
    the converged fit's ELBO: the state really carries the variational parameters."""
    evidence, _, state, fresh, frozen = converged_and_frozen(seed=1)
    frozen.init(jax.random.PRNGKey(0), evidence)
    _, warm = frozen.update(state, evidence, jax.random.PRNGKey(2))
    assert abs(warm.elbo - fresh.elbo) < 4 * (warm.elbo_se + fresh.elbo_se)
    # A cold start from the initial values is far worse than the warm start.
    cold_state = frozen.init(jax.random.PRNGKey(0), evidence)
    _, cold = frozen.update(cold_state._replace(total_steps=1), evidence, jax.random.PRNGKey(2))
    assert cold.elbo < warm.elbo - 10.0


def _guide_args(config: ModelConfig):
    cohort, patient, exposure, time, outcome = small_programme(40, seed=2)
    stats = stats_from_events(40, patient, exposure, time, outcome, config)
    evidence = pad_evidence(stats, cohort, 3)
    return evidence, (evidence.gram, evidence.cohort, evidence.num_cohorts, config)


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig(standardization=Standardization(time_scale=10.0)),
        ModelConfig(time_trend=False, cohort_level=False, effect_pooling="complete"),
    ],
    ids=["trend-cohorts-partial", "no-trend-complete"],
)
def test_guide_prototype_equals_numpyros(config):
    """The guide reads the model's sites from an abstract trace instead of numpyro's
    eager setup (initialize_model). Reference: numpyro's own AutoMultivariateNormal set
    up on the same model and initial values. Same sites in the same order, the same
    unconstrained initial point, and the same constrained values of any latent
    vector (numpyro's by running the model per draw). Tolerance 1e-12 relative:
    the same float64 bijections, evaluated jitted here and eagerly there."""
    fitter = PopulationFitter(config)
    _, args = _guide_args(config)
    ours = fitter.guide
    ours._setup_prototype(*args)
    reference = AutoMultivariateNormal(
        hyper_model, init_loc_fn=init_to_value(values=_initial_values(config)), init_scale=0.05
    )
    with handlers.seed(rng_seed=0):
        reference._setup_prototype(*args)
    latent_sites = [
        name
        for name, site in reference.prototype_trace.items()
        if site["type"] == "sample" and not site["is_observed"]
    ]
    assert list(ours.prototype_trace) == latent_sites == list(ours._init_locs)
    assert list(reference._init_locs) == latent_sites
    assert ours.latent_dim == reference.latent_dim
    np.testing.assert_allclose(ours._init_latent, reference._init_latent, rtol=1e-12, atol=0)
    latent = np.random.default_rng(3).normal(0.0, 1.0, (5, reference.latent_dim))
    constrained = ours._unpack_and_constrain(latent, {})
    expected = reference._unpack_and_constrain(latent, {})
    for name in latent_sites:
        np.testing.assert_allclose(constrained[name], expected[name], rtol=1e-12, atol=1e-300)


def test_ordered_elbo_equals_numpyros_trace_elbo():
    """OrderedTraceELBO sums numpyro's per-site terms in sorted order instead of a
    set's. Reference: numpyro's Trace_ELBO with the same key, params and model, at a
    point away from the initial one, for 1 and 4 particles. Only the order of ~10
    float64 additions differs: relative 1e-12 is a thousand times their rounding."""
    config = ModelConfig(standardization=Standardization(time_scale=10.0))
    evidence, args = _guide_args(config)
    fitter = PopulationFitter(config, SVIConfig(fresh_steps=50, num_particles=2))
    state, _ = fitter.update(
        fitter.init(jax.random.PRNGKey(0), evidence), evidence, jax.random.PRNGKey(1)
    )
    params = fitter.params(state)
    for particles in (1, 4):

        @jax.jit
        def losses(key, params, particles=particles):
            return [
                elbo.loss(key, params, hyper_model, fitter.guide, *args)
                for elbo in (OrderedTraceELBO(particles), Trace_ELBO(particles))
            ]

        for seed in range(3):
            ours, numpyros = losses(jax.random.PRNGKey(seed), params)
            assert float(ours) == pytest.approx(float(numpyros), rel=1e-12)


def test_a_new_fitter_resumes_from_the_published_q():
    """What a worker that takes over a measure does: a new fitter (another
    process, a vanishing learning rate so it cannot move) resumes from the q a
    converged fit published (its unconstrained loc and scale_tril): its first,
    warm, update has the converged fit's ELBO; a cold start has a far worse one."""
    evidence, fitter, state, fresh, frozen = converged_and_frozen(seed=2)
    published = fitter.guide.get_transform(fitter.params(state))
    initial = frozen.init(jax.random.PRNGKey(0), evidence)
    resumed = frozen.resume(
        initial, np.asarray(published.loc), np.asarray(published.scale_tril),
        total_steps=fresh.steps, version=7,
    )  # fmt: skip
    after, warm = frozen.update(resumed, evidence, jax.random.PRNGKey(2))
    assert warm.steps == 50  # the warm schedule, not a fresh fit's 1500 steps
    assert after.version == 8
    assert abs(warm.elbo - fresh.elbo) < 4 * (warm.elbo_se + fresh.elbo_se)
    _, cold = frozen.update(initial._replace(total_steps=1), evidence, jax.random.PRNGKey(2))
    assert cold.elbo < warm.elbo - 10.0
    with pytest.raises(ValueError, match="dimension"):
        frozen.resume(initial, np.zeros(3), np.eye(3), total_steps=1, version=1)


def test_a_new_owner_continues_the_published_posterior_warm():
    """streams.population_book.PopulationModel.continue_from: the first fit of a
    new owner takes warm updates from the published q (far fewer steps than a
    fresh fit) and lands where the publisher's converged fit was: the effect
    within a quarter of its posterior sd (SVI noise), the sd within 20%."""
    from streams.population_book import PopulationModel

    config = ModelConfig(standardization=Standardization(time_scale=10.0))
    cohort, patient, exposure, time, outcome = small_programme(40, seed=3)
    stats = stats_from_events(40, patient, exposure, time, outcome, config)
    cohorts = ["a", "b", "c"]
    first = PopulationModel("m", config).fit(stats, cohort, cohorts).message
    owner = PopulationModel("m", config)  # the worker's defaults
    owner.continue_from(first)
    second = owner.fit(stats, cohort, cohorts).message
    assert second.version == first.version + 1
    assert second.svi_steps <= 500 < first.svi_steps
    a, b = first.summary["effect"], second.summary["effect"]
    assert abs(a.mean - b.mean) <= 0.25 * a.sd
    assert 0.8 <= b.sd / a.sd <= 1.25
