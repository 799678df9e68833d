"""Compilation of the population fit (model.population) and of ``efficacy fit``.

numpyro's autoguide set itself up by running the model eagerly, one XLA compile
per operation (387 of the 450 compiles of an ``efficacy fit`` of sleepstudy),
and none was kept across processes. Now every step of a fit is one jitted call,
compiled once per padded shape: nothing may run the model on concrete values, a
second fit of same-shape evidence may compile nothing, and a second ``efficacy
fit`` process loads every program from JAX's persistent compilation cache.
Counted with jax.monitoring's compile and cache events and the fitter's own
trace counter (the pattern of blackjax's tests/test_compilation.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import jax
import numpy as np

import model.population as population
from model.config import ModelConfig, Standardization, SVIConfig
from model.evidence import stats_from_events
from model.population import PopulationFitter, pad_evidence

jax.config.update("jax_enable_x64", True)

REPO = Path(__file__).resolve().parent.parent
SLEEPSTUDY = REPO / "tests" / "data" / "sleepstudy" / "sleepstudy.csv"
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CONFIG = ModelConfig(standardization=Standardization(time_scale=10.0))
# A configuration no other test fits, so the first fit here compiles for certain.
SVI = SVIConfig(fresh_steps=100, update_steps=50, num_particles=3, num_draws=37)


@contextmanager
def compiles() -> Iterator[list[str]]:
    """Names of the programs XLA compiles inside the block."""
    names: list[str] = []

    def listener(event: str, duration: float, **kwargs: object) -> None:
        if event == COMPILE_EVENT:
            names.append(str(kwargs.get("fun_name", "?")))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def evidence_of(num_patients: int, seed: int):
    rng = np.random.default_rng(seed)
    cohort = rng.integers(0, 3, num_patients)
    patient = np.repeat(np.arange(num_patients), 10)
    time = np.tile(np.arange(10.0), num_patients)
    exposure = (time >= 5).astype(float)
    effect = rng.normal(-1.0, 0.5, num_patients)
    outcome = rng.normal(0.0, 1.0, num_patients)[patient] + effect[patient] * exposure
    outcome = outcome + rng.normal(0.0, 0.5, patient.size)
    stats = stats_from_events(num_patients, patient, exposure, time, outcome, CONFIG)
    return pad_evidence(stats, cohort, 3)


def fit(fitter: PopulationFitter, evidence, seed: int) -> None:
    """What a fit does: init, a fresh update, a warm update, draws, parameters."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    state = fitter.init(keys[0], evidence)
    state, _ = fitter.update(state, evidence, keys[1])
    state, _ = fitter.update(state, evidence, keys[2])
    draws = fitter.draws(state, keys[3])
    assert np.all(np.isfinite(np.asarray(draws.mu)))
    assert np.all(np.isfinite(np.asarray(fitter.params(state)["auto_loc"])))


def test_a_second_fit_of_same_shape_evidence_compiles_nothing():
    fitter = PopulationFitter(CONFIG, SVI)
    first, second = evidence_of(40, seed=0), evidence_of(50, seed=1)  # both pad to 64 patients
    assert first.gram.shape == second.gram.shape
    with compiles() as first_compiles:
        fit(fitter, first, seed=0)
    # The counter sees compiles: the first fit compiles its jitted calls.
    assert any("run_chunk" in name for name in first_compiles), first_compiles
    traces = fitter.trace_count
    assert traces == 2  # the fresh and the warm chunk, one trace each
    with compiles() as second_compiles:
        fit(fitter, second, seed=1)
    assert second_compiles == []
    assert fitter.trace_count == traces


def test_nothing_evaluates_the_model_eagerly(monkeypatch):
    """Every evaluation of the collapsed likelihood during init, updates, draws
    and parameters is traced (it sees tracers, never concrete arrays): numpyro's
    eager setup evaluated it on the evidence, operation by operation."""
    seen: list[bool] = []
    real = population.collapsed_loglik

    def spy(theta, gram, *args, **kwargs):
        seen.append(isinstance(gram, jax.core.Tracer))
        return real(theta, gram, *args, **kwargs)

    monkeypatch.setattr(population, "collapsed_loglik", spy)
    fit(PopulationFitter(CONFIG, SVI), evidence_of(40, seed=2), seed=2)
    assert seen and all(seen), seen


def efficacy_fit_process(cache: Path, output: Path, hash_seed: str) -> dict[str, int]:
    """``efficacy fit`` of sleepstudy in a new process with ``cache`` as its
    compilation cache; the persistent cache's hits and misses (programs written)."""
    driver = (
        "import json, sys, jax\n"
        "from cli.main import main\n"
        "events = {'hits': 0, 'misses': 0}\n"
        "names = {'/jax/compilation_cache/cache_hits': 'hits',\n"
        "         '/jax/compilation_cache/cache_misses': 'misses'}\n"
        "def listener(event, **kwargs):\n"
        "    if event in names: events[names[event]] += 1\n"
        "jax.monitoring.register_event_listener(listener)\n"
        "code = main(sys.argv[1:])\n"
        "print(json.dumps({'code': code, **events}))\n"
    )
    args = [
        "fit", "--input", str(SLEEPSTUDY), "--patient", "Subject", "--exposure", "Days",
        "--outcome", "Reaction", "--direction", "lower", "--mcid", "5", "--seed", "1",
        "--min-unexposed", "1", "--output", str(output), "--compilation-cache", str(cache),
    ]  # fmt: skip
    # Another string-hash seed in each process: a program whose lowering followed
    # set order would get another cache key and miss.
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    result = subprocess.run(
        [sys.executable, "-c", driver, *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    assert counts.pop("code") == 0
    return counts


def test_a_second_efficacy_fit_loads_every_program_from_the_cache(tmp_path):
    """Each process has another string-hash seed. The second finds no traced
    programs (model.exported) and traces them again, as a worker does: their
    lowering must not depend on the seed, so every compile hits JAX's cache, and
    it keeps them under the first's keys. The third loads them, traces nothing
    and compiles only them, from the cache."""
    cache = tmp_path / "jax-cache"
    first = efficacy_fit_process(cache, tmp_path / "first.json", hash_seed="1")
    assert first["misses"] > 0  # the first process compiled and wrote its programs
    exported = sorted(path.name for path in (cache / "exported").iterdir())
    assert exported
    shutil.rmtree(cache / "exported")
    second = efficacy_fit_process(cache, tmp_path / "second.json", hash_seed="2")
    assert second == {"hits": first["hits"] + first["misses"], "misses": 0}
    assert sorted(path.name for path in (cache / "exported").iterdir()) == exported
    # Nothing traced: one compile (from JAX's cache) per exported program, no other.
    third = efficacy_fit_process(cache, tmp_path / "third.json", hash_seed="3")
    assert third == {"hits": len(exported), "misses": 0}
    assert sorted(path.name for path in (cache / "exported").iterdir()) == exported
    # The same fit: the cached programs compute what the compiled ones did.
    results = [
        json.loads((tmp_path / f"{name}.json").read_text())["population"]
        for name in ("first", "second", "third")
    ]
    assert results[0] == results[1] == results[2]
