"""cli.programme: simulated programmes as producer records (no broker)."""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime

import numpy as np
import pytest
from pydantic import ValidationError

from cli.programme import (
    BAD_KINDS,
    EXPECTED_REASON,
    SOURCE_TOPIC,
    GroundTruth,
    Record,
    _honour_exposure,
    build_programme,
    records_digest,
    topic_schema,
)
from streams.catalogue import Catalogue

CATALOGUE = Catalogue.load()
SOURCE_TOPICS = ("wearables", "labs", "pros")


@pytest.fixture(scope="module", params=["baseline_then_exposure", "crossover"])
def programme(request):
    return build_programme(
        ["resting_heart_rate", "hba1c", "phq9"],
        num_patients=40,
        num_cohorts=6,
        obs_per_patient=25,
        design=request.param,
        seed=11,
        bad_fraction=0.05,
        duplicate_fraction=0.05,
        alternative_unit_fraction=0.3,
    )


def derived_exposure(enrollment_records: list[Record]) -> dict[str, list[tuple[datetime, float]]]:
    """Independent reading of the enrollments topic: per patient, the exposure
    steps (time, exposure) in send order, starting at 0 from enrolment."""
    steps: dict[str, list[tuple[datetime, float]]] = {}
    for record in enrollment_records:
        body = json.loads(record.value)
        at = datetime.fromisoformat(body["event_time"])
        if body["kind"] == "enrollment":
            assert body["patient_id"] not in steps, "enrolled twice"
            steps[body["patient_id"]] = [(at, 1.0 if body["exposed"] else 0.0)]
        else:
            assert body["patient_id"] in steps, "exposure change before enrolment"
            assert at >= steps[body["patient_id"]][-1][0], "exposure changes out of order"
            steps[body["patient_id"]].append((at, body["exposure"]))
    return steps


def exposure_at(steps: list[tuple[datetime, float]], at: datetime) -> float | None:
    current = None
    for when, exposure in steps:
        if when <= at:
            current = exposure
    return current


def readings(programme) -> list[Record]:
    return [r for topic in SOURCE_TOPICS for r in programme.records.get(topic, [])]


def simulated(record: Record) -> bool:
    """A reading of a simulated observation (or its duplicate), not an injected one."""
    return record.canonical_value is not None


def test_exposure_from_events_equals_simulated_exposure(programme):
    steps = derived_exposure(programme.records["enrollments"])
    checked = Counter()
    for record in readings(programme):
        if simulated(record):
            exposure = exposure_at(steps[record.patient_id], record.event_time)
            assert exposure is not None, "reading before enrolment"
            assert exposure == record.exposure
            checked[exposure] += 1
    assert checked[0.0] > 0 and checked[1.0] > 0
    # record.exposure is the simulator's: each measure's exposures, as a multiset
    for measure, sim in programme.simulated.items():
        ours = Counter(
            (int(r.patient_id.split("-")[1]), r.exposure)
            for r in readings(programme)
            if r.measure == measure and simulated(r) and r.label != "duplicate"
        )
        theirs = Counter(
            zip(sim.events.patient.tolist(), sim.events.exposure.tolist(), strict=True)
        )
        assert ours == theirs


def test_change_count_follows_design(programme):
    per_patient = Counter(r.patient_id for r in programme.records["enrollments"])
    expected = {"baseline_then_exposure": 2, "crossover": 4}[programme.truth.design]
    assert set(per_patient.values()) == {expected}
    first = next(iter(programme.truth.patients))
    changes = [
        json.loads(r.value)["exposure"]
        for r in programme.records["enrollments"]
        if r.patient_id == first and r.label == "exposure"
    ]
    assert (
        changes
        == {"baseline_then_exposure": [1.0], "crossover": [1.0, 0.0, 1.0]}[programme.truth.design]
    )


def test_exposure_from_enrolment_when_there_is_no_baseline():
    """baseline_fraction 0: the change is at the enrolment instant and governs
    every reading (a change at a reading's exact event time applies to it)."""
    programme = build_programme(
        ["resting_heart_rate"],
        num_patients=3,
        num_cohorts=1,
        obs_per_patient=4,
        seed=1,
        spec_overrides={"resting_heart_rate": {"baseline_fraction": 0.0}},
    )
    steps = derived_exposure(programme.records["enrollments"])
    assert all(when == steps[p][0][0] for p in steps for when, _ in steps[p])
    for record in readings(programme):
        assert exposure_at(steps[record.patient_id], record.event_time) == record.exposure == 1.0


def test_reading_rounded_onto_a_change_moves_before_it():
    """simulate compares phases; a reading just before a change that rounds to
    the change's microsecond must stay unexposed."""
    change_us = [np.array([1_000])]
    reading_us = np.array([999, 1_000, 1_000, 1_001])
    simulated_exposure = np.array([0.0, 0.0, 1.0, 1.0])
    fixed = _honour_exposure(
        reading_us, np.zeros(4, dtype=int), simulated_exposure, np.array([0]), change_us,
        [(0.3, 1.0)],
    )  # fmt: skip
    assert fixed.tolist() == [999, 999, 1_000, 1_001]
    with pytest.raises(RuntimeError):
        _honour_exposure(
            np.array([500]), np.zeros(1, dtype=int), np.array([1.0]), np.array([0]), change_us,
            [(0.3, 1.0)],
        )  # fmt: skip


def test_records_validate_except_injected_bad_ones(programme):
    labels = Counter()
    for topic, records in programme.records.items():
        schema = topic_schema(topic)
        for record in records:
            labels[record.label] += 1
            assert record.key is not None
            if record.label in BAD_KINDS and not simulated(record):
                if record.label in ("malformed_json", "missing_field"):
                    with pytest.raises(ValidationError):
                        schema.validate_json(record.value)
                continue
            event = schema.validate_json(record.value)
            assert record.key == event.patient_id.encode()
            if topic != "enrollments":
                spec = CATALOGUE.get(event.measure)
                assert SOURCE_TOPIC[spec.sources[0]] == topic
    for kind in BAD_KINDS:
        assert labels[kind] > 0, kind


def test_injected_bad_records_have_their_defect(programme):
    patients = set(programme.truth.patients)
    by_id = {r.event_id: r for topic in SOURCE_TOPICS for r in programme.records.get(topic, [])}
    injected = [b for b in programme.truth.bad_records if b.injected]
    assert len(injected) == round(
        0.05 * sum(1 for r in readings(programme) if simulated(r) and r.label != "duplicate")
    )
    for bad in injected:
        record = by_id[bad.event_id]
        assert bad.reason == EXPECTED_REASON[bad.kind]
        if bad.kind == "malformed_json":
            with pytest.raises(json.JSONDecodeError):
                json.loads(record.value)
            continue
        body = json.loads(record.value)
        spec = CATALOGUE.get(str(record.measure))
        if bad.kind == "missing_field":
            assert "value" not in body
        elif bad.kind == "unknown_measure":
            assert body["measure"] not in CATALOGUE.measures
        elif bad.kind == "unknown_unit":
            assert body["unit"] != spec.unit and body["unit"] not in spec.units
        elif bad.kind == "implausible_value":
            assert not spec.plausible_value(spec.to_canonical(body["value"], body["unit"]))
        elif bad.kind == "wrong_key":
            assert record.key.decode() != body["patient_id"]
            assert body["patient_id"] in patients


def test_duplicates_share_event_ids_and_bytes(programme):
    truth = programme.truth
    assert truth.duplicates
    ids = Counter(r.event_id for rs in programme.records.values() for r in rs)
    originals = {
        r.event_id: r for rs in programme.records.values() for r in rs if r.label != "duplicate"
    }
    assert len(originals) == sum(1 for rs in programme.records.values() for r in rs) - len(
        truth.duplicates
    ), "event ids are unique apart from duplicates"
    for duplicate in truth.duplicates:
        assert ids[duplicate.event_id] >= 2
        copies = [r for r in programme.records[duplicate.topic] if r.event_id == duplicate.event_id]
        assert len({(c.key, c.value) for c in copies}) == 1
        original = originals[duplicate.event_id]
        assert original.label == "valid"
        sent = programme.records[duplicate.topic]
        assert sent.index(original) < max(
            i for i, r in enumerate(sent) if r is not original and r.event_id == duplicate.event_id
        )


def test_alternative_units_round_trip_to_the_canonical_value(programme):
    converted = 0
    for record in readings(programme):
        if not simulated(record):
            continue
        body = json.loads(record.value)
        spec = CATALOGUE.get(body["measure"])
        if body["unit"] != spec.unit:
            converted += 1
        assert spec.to_canonical(body["value"], body["unit"]) == pytest.approx(
            record.canonical_value, rel=1e-12, abs=1e-12
        )
    assert converted > 0


def test_counts_and_order(programme):
    truth = programme.truth
    valid = [r for r in readings(programme) if r.label == "valid"]
    assert truth.valid_unique_readings == len(valid)
    assert sum(m.valid_unique_readings for m in truth.measures.values()) == len(valid)
    per_patient = Counter((r.patient_id, r.measure) for r in valid)
    for patient, entry in truth.patients.items():
        for measure, count in entry.valid_unique_readings.items():
            assert per_patient[(patient, measure)] == count
    for topic, records in programme.records.items():
        assert truth.sent[topic].records == len(records)
        assert truth.sent[topic].digest == records_digest((r.key, r.value) for r in records)
        firsts = [r.event_time for r in records if r.label != "duplicate"]
        assert firsts == sorted(firsts), f"{topic} not in event-time order"
    order = programme.send_order()
    n_enrol = len(programme.records["enrollments"])
    assert all(r.topic == "enrollments" for r in order[:n_enrol])
    assert all(r.topic != "enrollments" for r in order[n_enrol:])
    assert len(order) == sum(len(rs) for rs in programme.records.values())


def test_truth_matches_the_simulation_and_round_trips(programme):
    truth = programme.truth
    text = truth.to_json()
    assert GroundTruth.from_json(text) == truth
    assert json.loads(text)["patients"]
    cohorts = {entry.cohort for entry in truth.patients.values()}
    assert cohorts <= {f"clinic-{g:02d}" for g in range(6)}
    for measure, sim in programme.simulated.items():
        effects = np.array([truth.patients[p].effect[measure] for p in sorted(truth.patients)])
        np.testing.assert_array_equal(effects, sim.truth.effect)
        assert truth.measures[measure].unit == CATALOGUE.get(measure).unit


def test_simulated_values_are_in_the_measures_scale():
    programme = build_programme(list(CATALOGUE.measures), num_patients=60, seed=3)
    for measure, sim in programme.simulated.items():
        spec = CATALOGUE.get(measure)
        location, scale = spec.typical
        outcome = sim.events.outcome
        assert abs(np.median(outcome) - location) < 2.5 * scale, measure
        inside = np.mean([spec.plausible_value(v) for v in outcome])
        assert inside > 0.995, measure
        benefit = sim.spec.effect * (1 if spec.direction == "higher" else -1)
        assert benefit > spec.mcid, measure


def test_deterministic_and_argument_checks():
    a = build_programme(["phq9"], num_patients=5, seed=4, bad_fraction=0.1)
    b = build_programme(["phq9"], num_patients=5, seed=4, bad_fraction=0.1)
    assert a.truth == b.truth and a.records == b.records
    with pytest.raises(ValueError):
        build_programme(["phq9"], bad_fraction=1.5)
    with pytest.raises(KeyError):
        build_programme(["no_such_measure"])
    with pytest.raises(ValueError, match="structure"):
        build_programme(
            ["phq9", "hba1c"], num_patients=5, spec_overrides={"hba1c": {"baseline_fraction": 0.5}}
        )
