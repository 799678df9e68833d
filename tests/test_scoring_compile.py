"""Compiling scoring ahead of use (streams.scoring.compile_scoring).

A new padded batch size compiles the scoring and predictive functions (about a
second each on two cores) on the patients agent's event loop, which held the
stream up for seconds whenever batches changed size. The worker compiles every
shape once, off the loop, when a measure's first posterior arrives: afterwards
no batch size the agent can produce may compile again. JAX counts the compiled
shapes of a jitted function (``_cache_size``), which is what is checked, in a
process of its own: a worker's, not one whose caches other tests have used.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from model.config import DecisionRule
from model.likelihood import Hyper
from model.predictive import _residuals
from model.scores import _block_summary
from streams.app import measure_models
from streams.catalogue import Catalogue
from streams.patient_state import MeasureStats
from streams.scoring import (
    MeasurePosterior,
    PendingReading,
    compile_scoring,
    measure_scores,
    reading_residuals,
)
from streams.settings import Settings

MEASURE = "resting_heart_rate"
DRAWS = 24


def _posterior(model) -> MeasurePosterior:
    rng = np.random.default_rng(0)
    draws = Hyper(
        mu=jnp.asarray(rng.normal(0.0, 1.0, (DRAWS, 2))),
        tau=jnp.asarray(rng.uniform(0.1, 2.0, (DRAWS, 2))),
        corr_chol=jnp.broadcast_to(jnp.eye(2), (DRAWS, 2, 2)),
        tau_cohort=jnp.asarray(rng.uniform(0.05, 1.5, DRAWS)),
        sigma=jnp.asarray(rng.uniform(0.3, 2.0, DRAWS)),
        gamma=jnp.asarray(rng.normal(0.0, 1.0, (DRAWS, model.fixed_dim))),
    )
    return MeasurePosterior(
        measure=MEASURE,
        version=1,
        draws=draws,
        cohort_index={"clinic-a": 0},
        cohort_mean=np.zeros((DRAWS, 1)),
        cohort_var=np.full((DRAWS, 1), 0.5),
    )


def _compiled() -> tuple[int, int]:
    return _block_summary._cache_size(), _residuals._cache_size()


def test_no_batch_size_compiles_after_compile_scoring():
    result = subprocess.run(
        [sys.executable, "-c", "import test_scoring_compile as t; t.check_compilations()"],
        cwd=Path(__file__).resolve().parent,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip() == "checked", result.stdout[-2000:]


def check_compilations() -> None:
    catalogue = Catalogue.load()
    model = measure_models(catalogue, Settings())[MEASURE]
    spec = catalogue.get(MEASURE)
    posterior = _posterior(model)
    d = model.stat_dim
    gram = (np.eye(d) * 3.0).tolist()
    stats = MeasureStats(gram=gram, reference_time=20400.0, count_exposed=3, count_unexposed=3)
    reading = PendingReading(gram, 20400.0, "clinic-a", 1.0, 20401.0, 62.0, "wearables:0:1")

    def score(count: int) -> None:
        scores = measure_scores(
            posterior,
            [stats] * count,
            ["clinic-a"] * count,
            [[]] * count,
            spec,
            model,
            DecisionRule(),
        )
        assert len(scores) == count and all(np.isfinite(s.effect.mean) for s in scores)

    def residuals(count: int) -> None:
        z = reading_residuals(posterior, [reading] * count, model)
        assert z.shape == (count,) and np.all(np.isfinite(z))

    before = _compiled()
    runs = compile_scoring(posterior, spec, model, max_readings=100)
    after = _compiled()
    # 8..256 for scoring, 8..128 for readings: every one a new shape.
    assert runs == 6 + 5
    assert after[0] - before[0] == 6 and after[1] - before[1] == 5
    for count in (1, 5, 8, 9, 31, 100, 255, 256, 257, 700):
        score(count)
    for count in (1, 7, 8, 9, 64, 100):
        residuals(count)
    assert _compiled() == after
    # The check can fail: more readings than compiled for is a new shape.
    residuals(200)
    assert _compiled()[1] == after[1] + 1
    print("checked")
