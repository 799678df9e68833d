"""Structure selection by K-fold CV over held-out patients (model.selection).

The statistical tests use simulated programmes with fixed seeds. Each compares
only the two structures it is about (every structure costs one SVI compile).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import (
    COMPLETE_POOLING_EFFECT_SD,
    NO_POOLING_EFFECT_SD,
    ModelConfig,
    Standardization,
)
from model.evidence import stats_from_events
from model.likelihood import Hyper, collapsed_loglik
from model.offline import model_config_for
from model.population import PopulationFitter, pad_evidence
from model.selection import (
    candidate_structures,
    choose,
    compare,
    heldout_loglik,
    patient_folds,
    select_structure,
)
from model.simulate import ProgrammeSpec, simulate

REPO = Path(__file__).resolve().parent.parent
SLEEPSTUDY = REPO / "tests" / "data" / "sleepstudy" / "sleepstudy.csv"
SLEEP_ARGS = ["--patient", "Subject", "--exposure", "Days", "--outcome", "Reaction"]
SLEEP_ARGS += ["--direction", "lower", "--mcid", "5", "--min-unexposed", "1"]


def _programme(seed: int, **spec):
    sim = simulate(ProgrammeSpec(**spec), seed)
    events = sim.events
    config = model_config_for(events, time_trend=True, cohort_level=True)
    stats = stats_from_events(
        events.num_patients, events.patient, events.exposure, events.time, events.outcome, config
    )
    return events, config, stats


def _theta(tau_cohort: float) -> Hyper:
    return Hyper(
        mu=jnp.array([0.1, -0.4]),
        tau=jnp.array([0.8, 0.3]),
        corr_chol=jnp.array([[1.0, 0.0], [-0.3, np.sqrt(1 - 0.09)]]),
        tau_cohort=jnp.asarray(tau_cohort),
        sigma=jnp.asarray(0.5),
        gamma=jnp.array([0.05]),
    )


@pytest.mark.parametrize("cohort_level", [False, True])
def test_heldout_density_is_the_exact_predictive_ratio(cohort_level):
    """p(y_i | θ, train) = p(y_train, y_i | θ) / p(y_train | θ): the closed form of
    heldout_loglik against two evaluations of the collapsed likelihood, for held-out
    patients in cohorts with and without training patients."""
    events, _, _ = _programme(3, num_patients=30, num_cohorts=4, obs_per_patient=8)
    config = model_config_for(events, time_trend=True, cohort_level=cohort_level)
    stats = stats_from_events(
        events.num_patients, events.patient, events.exposure, events.time, events.outcome, config
    )
    cohort = np.asarray(events.cohort_of_patient).copy()
    cohort[[0, 1]] = 4  # a cohort with no training patients: the prior N(0, τ_u²) applies
    gram = jnp.asarray(stats.gram)
    train = np.arange(30) >= 3
    theta = _theta(0.4 if cohort_level else 0.0)
    draws = jax.tree.map(lambda x: x[None], theta)
    got = np.asarray(
        heldout_loglik(
            draws,
            gram[train],
            jnp.asarray(cohort[train]),
            gram[:3],
            jnp.asarray(cohort[:3]),
            5,
            config,
        )
    )[0]
    base = collapsed_loglik(theta, gram[train], jnp.asarray(cohort[train]), 5, config)
    for i in range(3):
        rows = np.concatenate([[i], np.flatnonzero(train)])
        joint = collapsed_loglik(theta, gram[rows], jnp.asarray(cohort[rows]), 5, config)
        # float64 sums of a few hundred terms: agreement to 1e-8 is rounding
        assert got[i] == pytest.approx(float(joint - base), abs=1e-8)


def test_folds_partition_patients_and_are_seeded():
    folds = patient_folds(23, 5, seed=4)
    assert sorted(np.bincount(folds).tolist()) == [4, 4, 5, 5, 5]
    assert np.array_equal(folds, patient_folds(23, 5, seed=4))
    assert not np.array_equal(folds, patient_folds(23, 5, seed=5))
    assert np.array_equal(np.sort(patient_folds(6, 10, seed=0)), np.arange(6))  # LOO


def test_fixed_effect_scales_of_complete_and_no_pooling():
    _events, config, stats = _programme(2, num_patients=40, num_cohorts=2, obs_per_patient=8)
    structures = {s.name: s for s in candidate_structures(config, ["clinic"])}
    assert set(structures) == {"complete", "none", "partial", "partial+clinic"}
    assert ModelConfig().effect_pooling == "partial"  # default behaviour unchanged
    for name, scale in [("complete", COMPLETE_POOLING_EFFECT_SD), ("none", NO_POOLING_EFFECT_SD)]:
        cfg = structures[name].config
        evidence = pad_evidence(stats, np.zeros(40, dtype=int), 1)
        fitter = PopulationFitter(cfg)
        state = fitter.init(jax.random.PRNGKey(0), evidence)
        draws = fitter.draws(state, jax.random.PRNGKey(1), 10)
        assert np.all(np.asarray(draws.tau)[:, 1] == scale)
        assert np.all(np.asarray(draws.corr_chol) == np.eye(2))


def test_compare_and_choose_on_known_pointwise_values():
    rng = np.random.default_rng(0)
    base = rng.normal(-30.0, 3.0, 100)
    noise = rng.normal(0.0, 1.0, 100)
    noise -= noise.mean() - 0.05  # the cohort structure leads by 5 in total, se ≈ 10
    table = compare({"partial": base, "partial+site": base + noise, "none": base - 2.0})
    rows = {row["structure"]: row for row in table}
    assert [row["structure"] for row in table] == ["partial+site", "partial", "none"]
    assert rows["partial+site"]["elpd_diff"] == 0.0
    assert rows["partial"]["elpd_diff"] == pytest.approx(-5.0)
    assert rows["partial"]["diff_se"] == pytest.approx(np.sqrt(100 * np.var(noise, ddof=1)))
    assert rows["none"]["elpd_diff"] == pytest.approx(-205.0)
    assert rows["partial"]["elpd_se"] == pytest.approx(np.sqrt(100 * np.var(base, ddof=1)))
    # the cohort structure's lead is within 2 se: partial pooling stays the choice
    assert choose({"partial": base, "partial+site": base + noise, "none": base - 2.0}) == "partial"
    assert choose({"partial": base, "partial+site": base + 1.0 + 0.1 * noise}) == "partial+site"
    assert choose({"none": base, "complete": base + 1.0}) == "complete"  # no reference: best


# One standardisation for the three statistical tests (close to what their data
# give: intercept 70, effect -4 on half the follow-up, outcome sd ≈ 8), so their
# structures share compiled fitters (FITTERS) and each SVI step compiles once.
SHARED_CONFIG = ModelConfig(
    standardization=Standardization(
        outcome_location=68.0, outcome_scale=8.0, time_location=67.5, time_scale=29.0
    )
)
FITTERS: dict = {}


def _selection(seed, only, **spec):
    events = simulate(ProgrammeSpec(**spec), seed).events
    config = SHARED_CONFIG
    stats = stats_from_events(
        events.num_patients, events.patient, events.exposure, events.time, events.outcome, config
    )
    result = select_structure(
        lambda _config: stats,
        config,
        {"clinic": events.cohort_of_patient},
        num_folds=4,
        seed=seed,
        only=only,
        fitters=FITTERS,
    )
    return result, {row["structure"]: row for row in result["table"]}


COMMON = {
    "num_patients": 160,
    "num_cohorts": 8,
    "baseline_fraction": 0.5,
    "effect_sd": 1.0,
    "residual_sd": 4.0,
}


def test_cohort_structure_wins_with_cohort_effects():
    """Cohort effects sd 4 bpm against a between-patient sd of 1: knowing the
    cohort narrows a new patient's effect prior ~4-fold, worth far more than 2 se."""
    result, rows = _selection(
        11, ["partial", "partial+clinic"], obs_per_patient=10, cohort_effect_sd=4.0, **COMMON
    )
    assert result["best"] == "partial+clinic"
    lead = -rows["partial"]["elpd_diff"]
    assert lead > 2.0 * rows["partial"]["diff_se"], result["table"]
    assert result["choice"] == "partial+clinic"


def test_cohort_structure_does_not_beat_partial_without_cohort_effects():
    """No cohort effects: the cohort level can only fit noise, so its elpd gain over
    partial pooling stays within one standard error of the difference."""
    result, _ = _selection(
        12, ["partial", "partial+clinic"], obs_per_patient=10, cohort_effect_sd=0.0, **COMMON
    )
    pointwise = {name: np.asarray(v) for name, v in result["pointwise"].items()}
    diff = pointwise["partial+clinic"] - pointwise["partial"]
    se = np.sqrt(diff.size * np.var(diff, ddof=1))
    assert diff.sum() < se, (diff.sum(), se)
    assert result["choice"] == "partial"


def test_no_pooling_loses_to_partial_pooling_on_sparse_data():
    """Six observations per patient (3 unexposed, 3 exposed): a patient's own data
    pin its effect down poorly, and the no-pooling prior (10 outcome sds) pays a
    large Occam penalty on every held-out patient."""
    result, rows = _selection(
        13, ["none", "partial"], obs_per_patient=6, cohort_effect_sd=0.0, **COMMON
    )
    assert result["best"] == "partial"
    assert -rows["none"]["elpd_diff"] > 2.0 * rows["none"]["diff_se"], result["table"]


def _fit_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streams.cli", "fit", *args],
        cwd=REPO, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip


def test_fit_select_rejects_unknown_cohort_columns(tmp_path):
    """The column check comes before any fitting: a typo fails fast and clearly."""
    result = _fit_cli(
        "--input", str(SLEEPSTUDY), *SLEEP_ARGS, "--select", "--cohort-columns", "site,Days2",
    )  # fmt: skip
    assert result.returncode == 2
    assert "missing cohort column(s) 'site', 'Days2'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_fit_select_on_sleepstudy(tmp_path):
    """efficacy fit --select: the table is printed and stored in the JSON. The
    18 subjects' slopes vary (lme4: sd 5.9 ms/day, profile CI 3.8-8.8), so no
    pooling and complete pooling must not beat partial pooling."""
    output = tmp_path / "fit.json"
    result = _fit_cli(
        "--input", str(SLEEPSTUDY), *SLEEP_ARGS, "--select", "--folds", "6", "--seed", "1",
        "--output", str(output),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    selection = json.loads(output.read_text())["selection"]
    assert {row["structure"] for row in selection["table"]} == {"complete", "none", "partial"}
    assert selection["best"] == "partial" and selection["choice"] == "partial"
    assert "diff se" in result.stdout and "partial" in result.stdout
