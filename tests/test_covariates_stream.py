"""Patient covariates through the stream's pure steps, without Kafka (issue 15).

A simulated programme whose enrolments carry age and group (the catalogue
declares them, cli.programme.SIMULATED_COVARIATES) goes through
``process_batch``; the evidence it emits feeds a PopulationBook and one
population fit, whose posterior then scores every patient (``rescore``).
Judged against the simulation's truth and the catalogue's rules: bad
covariates dead-lettered with their reason, nothing lost; the published effect
modifiers cover the true ones; each patient's population effect is the
population's effect for their own covariates.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cli.programme import SIMULATED_COVARIATES, build_programme
from model.config import DecisionRule
from model.evidence import stacked
from streams.app import measure_models
from streams.catalogue import DEFAULT_CATALOGUE, Catalogue
from streams.chunked_consumer import ChunkRecord
from streams.partitioning import key_partition
from streams.patient_state import PatientRecord
from streams.patient_step import StepContext, batch_keys, process_batch, rescore
from streams.population_book import PopulationBook, PopulationModel, StructureSelectionRun
from streams.posterior_feed import PosteriorBook
from streams.schemas import Enrollment, EvidenceBatch
from streams.scoring import reading_residuals
from streams.settings import Settings
from streams.subgroup_scores import BookSnapshot, subgroup_step

MEASURE = "resting_heart_rate"
PARTITIONS = 2
SETTINGS = Settings(max_age_days=36500.0, partitions=PARTITIONS)
EFFECT_PER_YEAR = 0.15  # bpm per year: older patients benefit less (lower is better)
GROUP_B = -4.0  # bpm: group B benefits more


SUBGROUPS = """
[subgroups.group-a]
description = "group A"
levels = { group = ["A"] }

[subgroups.group-b-over-50]
description = "group B, aged 50 and over"
levels = { group = ["B"] }
ranges = { age = [50.0, 200.0] }
"""


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> Catalogue:
    path = tmp_path_factory.mktemp("catalogue") / "measures.toml"
    path.write_text(DEFAULT_CATALOGUE.read_text() + SIMULATED_COVARIATES + SUBGROUPS)
    return Catalogue.load(path)


@pytest.fixture(scope="module")
def programme(catalogue):
    return build_programme(
        [MEASURE], catalogue=catalogue, num_patients=160, num_cohorts=4, obs_per_patient=16,
        seed=23, spec_overrides={MEASURE: {
            "with_covariates": True, "effect_per_year": EFFECT_PER_YEAR,
            "group_effects": (GROUP_B,), "adherence_low": 0.5, "time_covariate_effect": 2.0,
            "time_covariate_confounding": 1.0,
        }},
    )  # fmt: skip


def bad_enrolments(start_offset: int) -> list[ChunkRecord]:
    """Three enrolments the catalogue must refuse, each with its reason's detail."""
    cases = [
        ("bad-age", {"age": 300.0, "group": "A"}),
        ("bad-group", {"age": 40.0, "group": "Z"}),
        ("no-age", {"group": "B"}),
        ("typo", {"age": 50.0, "group": "A", "agee": 3}),
    ]
    records = []
    for k, (patient, covariates) in enumerate(cases):
        event = Enrollment(
            event_id=f"bad-enr-{k}", event_time="2026-01-02T00:00:00Z", patient_id=patient,
            cohort="clinic-0", covariates=covariates,
        )  # fmt: skip
        key = patient.encode()
        topic = f"{SETTINGS.topic_prefix}enrollments"
        value = event.model_dump_json().encode()
        partition = key_partition(key, PARTITIONS)
        records.append(ChunkRecord(key, value, topic, partition, start_offset + k, None))
    return records


def test_covariates_flow_from_enrolment_to_effect_modifiers_and_scores(catalogue, programme):
    models = measure_models(catalogue, SETTINGS)
    model = models[MEASURE]
    assert model.covariates == ("age", "group=B") and model.time_covariates == ("activity",)
    context = StepContext(catalogue, models, PosteriorBook(), SETTINGS)
    records = programme.as_read(SETTINGS.topic_prefix, PARTITIONS)
    records += bad_enrolments(10_000)
    states: dict[str, bytes] = {}
    outputs = []
    for start in range(0, len(records), 500):
        batch = records[start : start + 500]
        saves, out = process_batch({k: states.get(k) for k in batch_keys(batch)}, batch, context)
        states.update(saves)
        outputs.append(out)

    letters = [json.loads(m.value) for o in outputs for m in o.dead_letters]
    assert sorted(letter["reason"] for letter in letters) == ["invalid_covariate"] * 4
    details = " | ".join(letter["detail"] for letter in letters)
    for fragment in ("'age' = 300 is outside", "unknown level 'Z'", "'age' is required", "'agee'"):
        assert fragment in details
    accepted = sum(sum(o.accepted.values()) for o in outputs)
    assert accepted + len(letters) == len(records)  # nothing lost
    # Readings with their adherence (dose < 1) and time-varying covariate: the
    # statistics equal the batch computation over the simulated exposures.
    patients = sorted(programme.truth.patients)
    expected = programme.expected_statistics(MEASURE, model, patients)
    gram = stacked(
        [PatientRecord.model_validate_json(states[p]).measures[MEASURE].gram for p in patients],
        model.stat_shape,
    )
    np.testing.assert_allclose(gram, expected.gram, rtol=1e-9, atol=1e-8)

    book = PopulationBook(MEASURE, model)
    for o in outputs:
        for message in o.evidence:
            for item in EvidenceBatch.model_validate_json(message.value).items:
                book.put(item)
    truth = programme.truth.patients
    assert book.num_patients == len(truth)
    covariates = book.covariates_snapshot()
    stats, cohort, cohorts = book.snapshot()
    posterior = PopulationModel(MEASURE, model).fit(stats, cohort, cohorts, covariates).message

    # The effect modifiers: seeded, each true value inside its 90% interval.
    modifiers = {c.covariate: c.effect for c in posterior.coefficients}
    assert set(modifiers) == {"age", "group=B"}
    for name, true_value in (("age", EFFECT_PER_YEAR), ("group=B", GROUP_B)):
        assert modifiers[name].lower <= true_value <= modifiers[name].upper, (name, modifiers)
    assert modifiers["group=B"].upper < 0  # the programme learns group B benefits more

    posteriors = PosteriorBook()
    posteriors.offer(posterior)
    context = StepContext(catalogue, models, posteriors, SETTINGS)
    # The prior-data conflict check's residuals use each reading's dose and
    # time-varying covariate: the programme again, now with a posterior, gives
    # every reading's predictive residual; N(0, 1) while the posterior describes
    # the data.
    pending, replayed = [], {}
    for start in range(0, len(records), 500):
        batch = records[start : start + 500]
        saves, out = process_batch({k: replayed.get(k) for k in batch_keys(batch)}, batch, context)
        replayed.update(saves)
        pending += out.readings[MEASURE]
    residuals = reading_residuals(posteriors[MEASURE], pending, model)
    assert residuals.shape == (len(pending),) and np.all(np.isfinite(residuals))
    assert abs(residuals.mean()) < 0.15 and 0.8 < residuals.std() < 1.25, residuals.std()
    _, out = rescore(states, MEASURE, context, force=True)
    scores = {m.key.decode(): json.loads(m.value)["measures"][0] for m in out.scores}
    assert set(scores) == set(truth)
    # Each patient's population effect is μ_b + B_b x_i: linear in their covariates
    # with the published modifiers as slopes.
    ages = np.array([truth[p].covariates["age"] for p in scores])
    in_b = np.array([truth[p].covariates["group"] == "B" for p in scores], dtype=float)
    population = np.array([s["population_effect"] for s in scores.values()])
    design = np.column_stack([np.ones_like(ages), ages, in_b])
    _, per_year, group_b = np.linalg.lstsq(design, population, rcond=None)[0]
    assert per_year == pytest.approx(modifiers["age"].mean, rel=0.02)
    assert group_b == pytest.approx(modifiers["group=B"].mean, rel=0.02)
    # And the patients' own effects follow their truth.
    true_effect = np.array([truth[p].effect[MEASURE] for p in scores])
    estimated = np.array([s["effect"]["mean"] for s in scores.values()])
    assert np.corrcoef(true_effect, estimated)[0, 1] > 0.8

    # Subgroups: each one's mean effect covers the mean of its members' true
    # effects; a call that changes raises an alert.
    snapshot = BookSnapshot(stats.gram, cohort, cohorts, covariates)
    state, out = subgroup_step({}, posterior, snapshot, catalogue, model, DecisionRule())
    published = {score.subgroup: score for score in out.scores}
    assert set(published) == {"group-a", "group-b-over-50"} and not out.alerts
    for name, member in (
        ("group-a", lambda c: c["group"] == "A"),
        ("group-b-over-50", lambda c: c["group"] == "B" and c["age"] >= 50),
    ):
        ids = [p for p in truth if member(truth[p].covariates)]
        score = published[name]
        assert score.members == len(ids)
        true_mean = np.mean([truth[p].effect[MEASURE] for p in ids])
        assert score.effect.lower <= true_mean <= score.effect.upper, (name, score, true_mean)
    assert published["group-b-over-50"].call == "works"
    again, out = subgroup_step(state, posterior, snapshot, catalogue, model, DecisionRule())
    assert again == state and not out.scores  # nothing changed: nothing sent
    flipped = {**state, "group-b-over-50": state["group-b-over-50"].model_copy(
        update={"call": "uncertain"})}  # fmt: skip
    _, out = subgroup_step(flipped, posterior, snapshot, catalogue, model, DecisionRule())
    (alert,) = out.alerts
    assert (alert.kind, alert.subgroup, alert.previous, alert.current) == (
        "subgroup_call", "group-b-over-50", "uncertain", "works")  # fmt: skip

    # The population agent's structure selection compares each covariate block
    # with and without it; group (4 bpm more benefit in B against an effect sd of
    # 2.4) earns its place.
    run = StructureSelectionRun(
        MEASURE, model, (stats, cohort, cohorts), num_folds=3, covariates=covariates
    )
    selection = run.run()
    compared = {row.structure for row in selection.structures}
    assert {"partial+x:age+x:group", "partial+x:age", "partial+x:group"} <= compared
    assert "x:group" in selection.choice, selection


def test_enrolments_without_covariates_under_a_catalogue_without_them_still_validate():
    """Layout version 1 (no covariates) keeps working where none are declared;
    covariates sent to such a catalogue are refused, not silently dropped."""
    catalogue = Catalogue.load()
    context = StepContext(catalogue, measure_models(catalogue, SETTINGS), PosteriorBook(), SETTINGS)
    old = {
        "schema_version": 1, "event_id": "e1", "event_time": "2026-01-02T00:00:00Z",
        "kind": "enrollment", "patient_id": "p1", "cohort": "c1",
    }  # fmt: skip
    sent = {**old, "schema_version": 2, "event_id": "e2", "patient_id": "p2",
            "covariates": {"age": 50}}  # fmt: skip
    topic = f"{SETTINGS.topic_prefix}enrollments"
    batch = [
        ChunkRecord(b"p1", json.dumps(old).encode(), topic, key_partition(b"p1", PARTITIONS), 0, None),
        ChunkRecord(b"p2", json.dumps(sent).encode(), topic, key_partition(b"p2", PARTITIONS), 1, None),
    ]  # fmt: skip
    saves, out = process_batch({}, batch, context)
    assert set(saves) == {"p1"}
    (letter,) = [json.loads(m.value) for m in out.dead_letters]
    assert letter["reason"] == "invalid_covariate" and "declares none" in letter["detail"]


def test_documented_covariate_section_is_the_simulated_one():
    """docs/covariates.md shows the catalogue section the simulator's enrolments need."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "covariates.md").read_text()
    assert SIMULATED_COVARIATES.strip() in page
