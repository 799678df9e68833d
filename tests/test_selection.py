"""Structure selection by K-fold CV over held-out patients (model.selection),
offline and as the population agent runs it (PopulationService.select, without a
broker; the real-broker run is in tests/test_worker_metrics.py).

The statistical tests use simulated programmes with fixed seeds. Each compares
only the two structures it is about (every structure costs one SVI compile).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import faust
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from model.config import (
    COMPLETE_POOLING_EFFECT_SD,
    NO_POOLING_EFFECT_SD,
    ModelConfig,
    Standardization,
)
from model.evidence import events_stats, stats_from_events
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
from monitoring.metrics import STRUCTURES, create_metrics
from streams.agents.population import PopulationService
from streams.catalogue import Catalogue
from streams.population_book import PopulationBook, StructureSelectionRun
from streams.posterior_feed import PosteriorBook
from streams.schemas import EvidenceBatch, PatientEvidence, StructureSelection
from streams.settings import Settings
from streams.telemetry import Telemetry

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


@pytest.mark.slow
def test_selection_error_rates_over_seeds():
    """How often ``choose`` picks the wrong structure, over seeds (issue 19 item 5).

    - No cohort effects, 20 seeds: the cohort level nests partial pooling
      (τ_u → 0), so its expected held-out gain is ≤ 0, and choose needs a lead
      beyond 2 se of the paired difference: P(z > 2) ≤ 2.3% per seed for an
      approximately normal z. ≤ 0.46 wrong choices expected; 3 or more has
      binomial probability 1.0%. Choosing the best total without the margin
      would take the cohort level whenever its elpd is the larger (measured: 5
      of 20 seeds; at a 25% rate, 3 or more of 20 has probability 91%).
    - Cohort effects sd 4 bpm, 10 seeds: the lead is many se (seed 11 above), so
      a miss in any seed is a failure of power, not chance: 0 allowed.
    """
    wrong = []
    larger = 0
    for seed in range(300, 320):
        result, _ = _selection(
            seed, ["partial", "partial+clinic"], obs_per_patient=10, cohort_effect_sd=0.0, **COMMON
        )
        larger += result["best"] == "partial+clinic"
        if result["choice"] != "partial":
            wrong.append(seed)
    print(f"no cohort effects: cohort level had the larger elpd in {larger} of 20 seeds")
    assert len(wrong) <= 2, f"cohort level chosen without cohort effects in seeds {wrong}"
    missed = []
    for seed in range(400, 410):
        result, _ = _selection(
            seed, ["partial", "partial+clinic"], obs_per_patient=10, cohort_effect_sd=4.0, **COMMON
        )
        if result["choice"] != "partial+clinic":
            missed.append(seed)
    assert not missed, f"cohort level not chosen with cohort effects in seeds {missed}"


def _fit_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "fit", *args],
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


# ------------------------------------------- as the population agent runs it

STREAM_MEASURE = "resting_heart_rate"
STREAM_MODEL = (
    Catalogue.load()
    .get(STREAM_MEASURE)
    .model_config_for(time_origin_days=0.0, time_scale_days=30.0, half_life_days=None)
)


class FakeTopic:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, bytes]] = []

    async def send(self, *, key: bytes, value: bytes) -> None:
        self.sent.append((key, value))


def _evidence(seed: int, **spec) -> list[PatientEvidence]:
    events = simulate(ProgrammeSpec(**spec), seed).events
    stats = stats_from_events(
        events.num_patients, events.patient, events.exposure, events.time, events.outcome,
        STREAM_MODEL,
    )  # fmt: skip
    return [
        PatientEvidence(
            measure=STREAM_MEASURE,
            patient_id=f"patient-{i:03d}",
            cohort=f"clinic-{events.cohort_of_patient[i]:02d}",
            gram=stats.gram[i].tolist(),
            reference_time=float(stats.reference_time[i]),
            count_exposed=int(stats.count_exposed[i]),
            count_unexposed=int(stats.count_unexposed[i]),
        )
        for i in range(events.num_patients)
    ]


def _service() -> tuple[PopulationService, CollectorRegistry]:
    """The population agent's service on an app that never starts (no broker)."""
    app = faust.App("selection-test", broker="kafka://127.0.0.1:9", web_enabled=False)
    registry = CollectorRegistry()
    service = PopulationService(
        app,
        SimpleNamespace(structure_selection=FakeTopic()),  # type: ignore[arg-type]
        {STREAM_MEASURE: STREAM_MODEL},
        PosteriorBook(),
        Settings(selection_folds=4),
        Telemetry(create_metrics(registry)),
    )
    service.owns = lambda measure: True  # type: ignore[method-assign]
    # The statistical tests' compiled fitters: the same structures and padded shapes
    # (160 patients in 4 folds, 8 cohorts), so only complete pooling compiles here.
    service.selection_fitters = FITTERS
    return service, registry


def test_population_agent_selects_the_cohort_structure_and_publishes_it():
    """PopulationService.select on a book of a programme with cohort effects (as
    test_cohort_structure_wins_with_cohort_effects, all four structures): the
    cohort structure is chosen, published on the topic and exposed as metrics, and
    a population update waiting meanwhile gets the fit lock after one fold."""
    service, registry = _service()
    evidence = _evidence(11, obs_per_patient=10, cohort_effect_sd=4.0, **COMMON)
    service.take(EvidenceBatch(measure=STREAM_MEASURE, items=evidence))
    topic = service.topics.structure_selection

    async def select_while_an_update_waits():
        selection = asyncio.create_task(service.select(STREAM_MEASURE))
        await asyncio.sleep(0.05)
        assert service._fitting.locked()  # the selection's first fit
        async with service._fitting:  # as PopulationService.tick waits for it
            update_ran_mid_selection = not topic.sent
        return await selection, update_ran_mid_selection

    message, interleaved = asyncio.run(select_while_an_update_waits())
    assert interleaved
    rows = {row.structure: row for row in message.structures}
    assert set(rows) == {"complete", "none", "partial", "partial+cohort"} == set(STRUCTURES)
    assert message.current_structure == "partial+cohort"
    assert message.best == "partial+cohort" and message.choice == "partial+cohort"
    assert -rows["partial"].elpd_diff > 2.0 * rows["partial"].diff_se, message.structures
    assert rows["partial+cohort"].elpd_diff == 0.0 and rows["partial+cohort"].diff_se == 0.0
    assert (message.num_patients, message.num_cohorts, message.num_folds) == (160, 8, 4)
    assert len(message.evidence_digest) == 64

    assert len(topic.sent) == 1  # the worker created the topic at start (ensure_topics)
    key, value = topic.sent[0]
    assert key == STREAM_MEASURE.encode()
    assert StructureSelection.model_validate_json(value) == message

    get = registry.get_sample_value
    for name, row in rows.items():
        labels = {"measure": STREAM_MEASURE, "structure": name}
        assert get("efficacy_selection_elpd_diff", labels) == row.elpd_diff
        assert get("efficacy_selection_elpd_diff_se", labels) == row.diff_se
        assert get("efficacy_selection_chosen", labels) == (name == "partial+cohort")
    assert get("efficacy_selection_seconds_count", {"measure": STREAM_MEASURE}) == 1

    # The same evidence again: nothing new to compare, nothing published.
    assert asyncio.run(service.select(STREAM_MEASURE)) is None
    assert len(topic.sent) == 1


def test_a_single_cohort_has_no_cohort_structure_and_its_series_go():
    """One cohort: a cohort level is not identified, so three structures are
    compared; the gauges of an earlier selection's cohort structure are removed
    rather than left stale."""
    evidence = _evidence(12, obs_per_patient=6, **{**COMMON, "num_patients": 12, "num_cohorts": 1})
    book = PopulationBook(STREAM_MEASURE, STREAM_MODEL)
    for record in evidence:
        book.put(record)
    run = StructureSelectionRun(STREAM_MEASURE, STREAM_MODEL, book.snapshot(), num_folds=3)
    assert [s.name for s in run.structures] == ["complete", "none", "partial"]
    assert run.skipped == ["cohort"] and run.num_folds == 3

    registry = CollectorRegistry()
    telemetry = Telemetry(create_metrics(registry))

    def published(structures: list[str], choice: str) -> StructureSelection:
        rows = [
            {"structure": s, "elpd": -1.0, "elpd_se": 1.0, "elpd_diff": 0.0, "diff_se": 0.0}
            for s in structures
        ]
        return StructureSelection(
            event_id="selection:test", event_time="2026-01-01T00:00:00Z",
            measure=STREAM_MEASURE, current_structure="partial+cohort", choice=choice,
            best=choice, structures=rows, num_patients=12, num_cohorts=1, num_folds=3,
            seed=0, svi_steps=600, posterior_version=1, evidence_digest="x", seconds=1.0,
        )  # fmt: skip

    telemetry.selection_published(published(["partial+cohort", "partial", "none"], "partial"))
    telemetry.selection_published(published(["partial", "none"], "none"))
    get = registry.get_sample_value
    labels = {"measure": STREAM_MEASURE}
    assert get("efficacy_selection_chosen", {**labels, "structure": "partial+cohort"}) is None
    assert get("efficacy_selection_elpd_diff", {**labels, "structure": "partial+cohort"}) is None
    assert get("efficacy_selection_chosen", {**labels, "structure": "none"}) == 1
    assert get("efficacy_selection_chosen", {**labels, "structure": "partial"}) == 0
    assert get("efficacy_selection_seconds_count", labels) == 2


@pytest.mark.slow
def test_selection_keeps_the_covariate_that_modifies_the_effect_and_drops_the_other():
    """Age modifies the effect (0.3 bpm per year: 3.6 bpm across one age sd,
    against an effect sd of 1 bpm among patients of the same age); group does
    nothing. With and without each block, given the other: dropping age loses
    far more than 2 se, dropping group loses nothing, so the choice is
    partial pooling with age alone."""
    from model.covariates import column_blocks

    spec = ProgrammeSpec(**{
        **COMMON, "num_patients": 200, "num_cohorts": 1, "obs_per_patient": 10,
        "cohort_effect_sd": 0.0, "with_covariates": True, "effect_per_year": 0.3,
        "group_effects": (0.0,),
    })  # fmt: skip
    events = simulate(spec, seed=21).events
    config = model_config_for(events, time_trend=True, cohort_level=False)
    stats = events_stats(events, config)
    blocks = column_blocks(config.covariates)
    assert blocks == {"age": (0,), "group": (1,)}
    result = select_structure(
        lambda _config: stats, config, num_folds=5, seed=3,
        covariates=config.standardization.covariates(events.covariates),
        covariate_blocks=blocks,
    )  # fmt: skip
    rows = {row["structure"]: row for row in result["table"]}
    assert {"partial+x:age+x:group", "partial+x:age", "partial+x:group"} <= set(rows)
    pointwise = {name: np.asarray(v) for name, v in result["pointwise"].items()}
    without_age = pointwise["partial+x:age+x:group"] - pointwise["partial+x:group"]
    se = np.sqrt(without_age.size * np.var(without_age, ddof=1))
    assert without_age.sum() > 2 * se, result["table"]
    assert result["choice"] == "partial+x:age", result["table"]
