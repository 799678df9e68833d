"""Traced programs kept on disk (model.exported): the same results as tracing,
and never a wrong program for other shapes, configs or source.

A fit through an ``ExportCache`` runs the programs jax.export serialised (on a
miss, right after writing them, as a later process loads them); a fit without
one traces and compiles as before. Both must compute the same numbers, and a
fitter that finds every program on disk must not trace at all. The keys are
checked on a tiny function: another shape, dtype, static config or model
source, or a corrupt entry, is a miss that traces anew.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model.exported as exported
from model.config import MeasureConfig, ModelConfig, Standardization, SVIConfig
from model.events import Events
from model.evidence import stats_from_events
from model.exported import ExportCache
from model.offline import fit_programme
from model.population import PopulationFitter, pad_evidence

jax.config.update("jax_enable_x64", True)

CONFIG = ModelConfig(standardization=Standardization(time_scale=10.0))
SVI = SVIConfig(fresh_steps=50, update_steps=50, num_particles=1, num_draws=23)
TOLERANCE = 1e-12


def evidence_of(num_patients: int, seed: int):
    rng = np.random.default_rng(seed)
    cohort = rng.integers(0, 3, num_patients)
    patient = np.repeat(np.arange(num_patients), 8)
    time = np.tile(np.arange(8.0), num_patients)
    exposure = (time >= 4).astype(float)
    effect = rng.normal(-1.0, 0.5, num_patients)
    outcome = rng.normal(0.0, 1.0, num_patients)[patient] + effect[patient] * exposure
    outcome = outcome + rng.normal(0.0, 0.5, patient.size)
    stats = stats_from_events(num_patients, patient, exposure, time, outcome, CONFIG)
    return pad_evidence(stats, cohort, 3)


def fit(fitter: PopulationFitter, evidence, seed: int = 0) -> dict[str, np.ndarray]:
    """init, a fresh and a warm update, draws and parameters, as arrays."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    state = fitter.init(keys[0], evidence)
    state, fresh = fitter.update(state, evidence, keys[1])
    state, warm = fitter.update(state, evidence, keys[2])
    draws = fitter.draws(state, keys[3])
    out = {f"draws.{name}": np.asarray(value) for name, value in draws._asdict().items()}
    out.update({f"params.{k}": np.asarray(v) for k, v in fitter.params(state).items()})
    out["fresh_losses"], out["warm_losses"] = fresh.losses, warm.losses
    return out


def assert_same(left: dict[str, np.ndarray], right: dict[str, np.ndarray]) -> None:
    assert left.keys() == right.keys()
    for name in left:
        if left[name].dtype == object:  # a site the model does not have (None)
            assert left[name].item() is None and right[name].item() is None, name
            continue
        np.testing.assert_allclose(left[name], right[name], rtol=TOLERANCE, atol=TOLERANCE)


def test_the_exported_path_computes_what_the_traced_path_does(tmp_path):
    evidence = evidence_of(20, seed=0)
    traced = fit(PopulationFitter(CONFIG, SVI), evidence)

    cache = ExportCache(tmp_path)
    assert_same(fit(PopulationFitter(CONFIG, SVI, export_cache=cache), evidence), traced)
    assert cache.misses > 0 and cache.written == cache.misses and cache.hits == 0

    # A later process: every program from disk, nothing traced, the same numbers.
    loading_cache = ExportCache(tmp_path)
    loading = PopulationFitter(CONFIG, SVI, export_cache=loading_cache)
    assert_same(fit(loading, evidence), traced)
    assert loading_cache.misses == 0 and loading_cache.hits == cache.misses
    assert loading.trace_count == 0
    assert loading.guide.prototype_trace is None  # not even the guide was set up

    # resume and a program not on disk need the guide that tracing init sets up
    # as a side effect: a fitter whose init came from disk sets it up then.
    state = loading.init(jax.random.PRNGKey(0), evidence)
    params = loading.params(state)
    resumed = loading.resume(
        state, params["auto_loc"], params["auto_scale_tril"], total_steps=100, version=1
    )
    assert loading.guide.latent_dim == params["auto_loc"].shape[0]
    draws = loading.draws(resumed, jax.random.PRNGKey(1), num_draws=7)  # a miss
    assert np.asarray(draws.mu).shape == (7, 2)
    assert loading_cache.misses == 1


def test_fit_programme_gives_the_same_result_with_and_without_the_cache(tmp_path):
    """The whole offline fit (keys, fit, draws, patient and cohort summaries):
    the same JSON traced, exported, and loaded back."""
    rng = np.random.default_rng(5)
    num_patients = 12
    patient = np.repeat(np.arange(num_patients), 10)
    time = np.tile(np.arange(10.0), num_patients)
    exposure = (time >= 5).astype(float)
    outcome = rng.normal(0, 1, num_patients)[patient] - 0.8 * exposure
    events = Events(
        patient=patient,
        cohort_of_patient=np.arange(num_patients) % 3,
        time=time,
        exposure=exposure,
        outcome=outcome + rng.normal(0, 0.5, patient.size),
    )
    measure = MeasureConfig(name="y", unit="", direction="lower", mcid=0.5)

    def run(cache: ExportCache | None) -> dict:
        result, _ = fit_programme(events, measure, seed=3, svi_config=SVI, export_cache=cache)
        result["diagnostics"].pop("seconds")
        return result

    traced = run(None)
    assert "cohorts" in traced  # the cohort summaries are on this path too
    assert run(ExportCache(tmp_path)) == traced
    loading = ExportCache(tmp_path)
    assert run(loading) == traced
    assert loading.misses == 0 and loading.hits > 0


@partial(jax.jit, static_argnames="power")
def scaled(x: jax.Array, scale: jax.Array, power: int) -> dict[str, jax.Array]:
    return {"y": scale * x**power, "sum": jnp.sum(x)}


def call(cache: ExportCache, x, scale=2.0, power: int = 2):
    return cache.wrap("test.scaled", partial(scaled, power=power), power)(x, jnp.asarray(scale))


@pytest.mark.parametrize(
    "other",
    [
        {"x": np.arange(4.0)},  # another shape
        {"x": np.arange(3, dtype=np.float32)},  # another dtype
        {"power": 3},  # another static config
    ],
    ids=["shape", "dtype", "static"],
)
def test_another_shape_dtype_or_config_misses_instead_of_running_a_wrong_program(tmp_path, other):
    x = np.arange(3.0)
    first = ExportCache(tmp_path)
    np.testing.assert_array_equal(call(first, x)["y"], 2.0 * x**2)
    assert (first.misses, first.written) == (1, 1)

    again = ExportCache(tmp_path)
    np.testing.assert_array_equal(call(again, x)["y"], 2.0 * x**2)
    np.testing.assert_array_equal(call(again, x, scale=5.0)["y"], 5.0 * x**2)  # a value: a hit
    assert (again.hits, again.misses) == (1, 0)

    args = {"x": x, "power": 2, **other}
    result = call(again, args["x"], power=args["power"])
    np.testing.assert_allclose(result["y"], 2.0 * args["x"] ** args["power"], rtol=1e-6)
    assert result["y"].shape == args["x"].shape and result["y"].dtype == args["x"].dtype
    assert (again.hits, again.misses) == (1, 1)
    assert len(list(tmp_path.glob(f"*{exported.SUFFIX}"))) == 2


def test_changed_model_source_or_a_corrupt_entry_misses(tmp_path, monkeypatch):
    x = np.arange(3.0)
    call(ExportCache(tmp_path), x)
    (entry,) = tmp_path.glob(f"*{exported.SUFFIX}")

    entry.write_bytes(b"not a program")
    corrupt = ExportCache(tmp_path)
    np.testing.assert_array_equal(call(corrupt, x)["y"], 2.0 * x**2)
    assert (corrupt.hits, corrupt.misses, corrupt.written) == (0, 1, 1)  # rewritten

    assert ExportCache(tmp_path).key("f", scaled, 2, (x,)) == ExportCache(tmp_path).key(
        "f", scaled, 2, (x,)
    )
    before = ExportCache(tmp_path).key("f", scaled, 2, (x,))
    monkeypatch.setattr(exported, "source_digest", lambda: "another model/ source")
    assert ExportCache(tmp_path).key("f", scaled, 2, (x,)) != before
    edited = ExportCache(tmp_path)
    call(edited, x)
    assert (edited.hits, edited.misses) == (0, 1)


def test_the_source_digest_covers_every_model_file():
    digest = exported.source_digest()
    assert len(digest) == 64 and digest == exported.source_digest()
