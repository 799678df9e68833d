"""The agents' pure logic without a broker: ingest validation and the patient
state step, checked against the batch computation over unique events.

The programme (cli.programme) says what every record is: valid, duplicate,
or a bad record with its expected dead-letter reason, and the exposure the
simulation used at every reading. The state step must reproduce the batch
statistics (model.evidence.stats_from_events) of the unique valid readings with
exactly that exposure, whatever the arrival order, replays and duplicates.
"""

from __future__ import annotations

import base64
import json
import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from cli.programme import build_programme
from model.evidence import stacked, stats_from_events
from streams.app import measure_models
from streams.catalogue import Catalogue
from streams.patient_state import (
    RECENT_KEEP,
    SEEN_KEEP,
    PatientRecord,
    apply_event,
    days,
    recent_window_stats,
)
from streams.schemas import Enrollment, EnrollmentRecord, ExposureChange, Observation, Origin
from streams.settings import Settings
from streams.validation import Rejected, validate_enrollment, validate_observation

CATALOGUE = Catalogue.load()
SETTINGS = Settings(max_age_days=36500.0)
MODELS = measure_models(CATALOGUE, SETTINGS)


def ingest(programme, order):
    """Validate every record as the ingest agents do; origin = (topic, 0, position)."""
    accepted, rejected = [], []
    for position, record in enumerate(order):
        origin = Origin(topic=record.topic, partition=0, offset=position)
        try:
            if record.topic == "enrollments":
                accepted.append(validate_enrollment(record.key, record.value, origin, SETTINGS))
            else:
                accepted.append(
                    validate_observation(
                        record.topic, record.key, record.value, origin, CATALOGUE, SETTINGS
                    )
                )
        except Rejected as error:
            rejected.append((record, error.reason))
    return accepted, rejected


def run_state(events):
    records: dict[str, PatientRecord] = {}
    # Every step goes through the table's JSON form, as in the worker.
    roundtrip = PatientRecord.model_validate_json
    # The dead-letter topic is at-least-once: a replayed duplicate is dead-lettered
    # again, and its origin (topic, partition, offset) identifies it.
    rejected: dict[tuple, str] = {}
    replays = 0
    for event in events:
        record, outcome = apply_event(records.get(event.patient_id), event, MODELS)
        records[event.patient_id] = roundtrip(record.model_dump_json())
        for rejected_event, reason, _ in outcome.rejected:
            origin = rejected_event.origin
            rejected[(origin.topic, origin.partition, origin.offset)] = reason
        replays += outcome.replays
    return records, Counter(rejected.values()), replays


@pytest.fixture(scope="module")
def programme():
    return build_programme(
        ["resting_heart_rate", "hba1c"],
        num_patients=40,
        num_cohorts=4,
        obs_per_patient=12,
        design="crossover",
        seed=5,
        bad_fraction=0.05,
        duplicate_fraction=0.05,
    )


def test_ingest_rejects_exactly_the_bad_records_with_their_reasons(programme):
    order = programme.send_order()
    accepted, rejected = ingest(programme, order)
    expected = Counter(b.reason for b in programme.truth.bad_records)
    assert Counter(reason for _, reason in rejected) == expected
    assert len(accepted) + len(rejected) == len(order)
    # Canonical units: every accepted reading carries the simulated canonical value.
    by_id = {r.event_id: r for r in order if r.label == "valid"}
    for event in accepted:
        if isinstance(event, Observation):
            assert event.value == pytest.approx(by_id[event.event_id].canonical_value, rel=1e-9)


@pytest.mark.parametrize("shuffle_seed", [None, 1, 2])
def test_state_equals_batch_over_unique_events_in_any_order(programme, shuffle_seed):
    """Duplicates are dead-lettered, replays ignored, early readings held until
    enrolment, and the statistics equal the batch computation (crossover: the
    withdrawal period counts as unexposed)."""
    accepted, _ = ingest(programme, programme.send_order())
    events = list(accepted)
    if shuffle_seed is not None:  # readings may now arrive before their enrolment
        random.Random(shuffle_seed).shuffle(events)
    replayed = events[: len(events) // 3]  # a restart re-delivers a third of the stream
    records, reasons, replays = run_state(events + replayed)

    assert reasons == Counter({"duplicate": len(programme.truth.duplicates)})
    first_arrival: dict[str, Origin] = {}
    for e in events:
        event_id = e.event_id if isinstance(e, Observation) else e.event.event_id
        first_arrival.setdefault(event_id, e.origin)
    assert replays == sum(
        1
        for e in replayed
        if first_arrival[e.event_id if isinstance(e, Observation) else e.event.event_id] == e.origin
    )
    patients = sorted(programme.truth.patients)
    assert all(records[p].enrolled and not records[p].pending for p in patients)
    for measure in ("resting_heart_rate", "hba1c"):
        expected = programme.expected_statistics(measure, MODELS[measure], patients)
        gram = stacked(
            [records[p].measures[measure].gram for p in patients], expected.gram.shape[1:]
        )
        np.testing.assert_allclose(gram, expected.gram, rtol=1e-10, atol=1e-9)
        exposed = [records[p].measures[measure].count_exposed for p in patients]
        unexposed = [records[p].measures[measure].count_unexposed for p in patients]
        np.testing.assert_array_equal(exposed, expected.count_exposed)
        np.testing.assert_array_equal(unexposed, expected.count_unexposed)
        # crossover: exposure is on, off (withdrawal), on again
        assert min(unexposed) > 0 and min(exposed) > 0
        assert_recent_window_is_batch(records, patients, measure, programme)


def assert_recent_window_is_batch(records, patients, measure, programme):
    """The recent-window statistics (fast forgetting) equal the batch computation
    with the recent half-life over the same unique readings."""
    window = MODELS[measure].recent_window
    assert window is not None and window.half_life == SETTINGS.recent_half_life_days
    expected = programme.expected_statistics(measure, window, patients)
    gram = np.stack(
        [
            recent_window_stats(records[p], records[p].measures[measure], MODELS[measure]).gram[0]
            for p in patients
        ]
    )
    np.testing.assert_allclose(gram, expected.gram, rtol=1e-9, atol=1e-9)
    # Fast forgetting: the recent window weighs less than all readings.
    all_time = stacked([records[p].measures[measure].gram for p in patients], gram.shape[1:])
    assert np.all(gram[:, 0, 0] < all_time[:, 0, 0])


def test_the_window_statistics_kept_reading_by_reading_equal_their_parts_after_every_event(
    programme,
):
    """The window statistics a record keeps up to date (MeasureStats.window_gram)
    equal, after every event (readings before and after their enrolment, exposure
    changes arriving late, sealing), the window statistics computed afresh from
    the sealed window statistics and the recent readings (river's check of an
    incremental statistic against its batch computation)."""
    accepted, _ = ingest(programme, programme.send_order())
    events = list(accepted)
    random.Random(5).shuffle(events)  # exposure changes arrive after their readings
    records: dict[str, PatientRecord] = {}
    checked = 0
    for event in events:
        record, _ = apply_event(records.get(event.patient_id), event, MODELS)
        records[event.patient_id] = record
        for measure, stats in record.measures.items():
            model = MODELS[measure]
            kept = recent_window_stats(record, stats, model)
            afresh = stats.model_copy(update={"window_gram": None, "window_half_life": None})
            expected = recent_window_stats(record, afresh, model)
            assert (kept is None) == (expected is None)
            if kept is not None:
                assert stats.window_gram is not None
                np.testing.assert_allclose(kept.gram, expected.gram, rtol=1e-9, atol=1e-12)
                checked += 1
    assert checked > len(events) // 2


def test_readings_before_enrolment_are_held_then_applied(programme):
    accepted, _ = ingest(programme, programme.send_order())
    patient = sorted(programme.truth.patients)[0]
    mine = [e for e in accepted if e.patient_id == patient]
    readings = [e for e in mine if isinstance(e, Observation)]
    enrolment = [e for e in mine if not isinstance(e, Observation)]
    record, _, _ = run_state(readings[:3])
    assert not record[patient].enrolled
    assert len(record[patient].pending) == 3
    assert record[patient].measures == {}
    records, reasons, _ = run_state(readings[:3] + enrolment + readings[3:])
    assert not records[patient].pending
    total = sum(s.count_exposed + s.count_unexposed for s in records[patient].measures.values())
    assert total == len(readings) - reasons["duplicate"]


def test_ingest_reasons_for_hand_made_bad_records():
    origin = Origin(topic="wearables", partition=0, offset=0)
    good = (
        b'{"event_id":"e","event_time":"2026-03-01T00:00:00Z","patient_id":"p",'
        b'"measure":"resting_heart_rate","value":%s,"unit":"%s"}'
    )

    def reason(source: str, key: bytes | None, value: bytes | None) -> str:
        with pytest.raises(Rejected) as error:
            validate_observation(source, key, value, origin, CATALOGUE, SETTINGS)
        return error.value.reason

    assert reason("wearables", b"p", None) == "empty"
    assert reason("wearables", b"p", b"x" * 70_000) == "oversized"
    assert reason("wearables", b"p", b"[1,2") == "malformed_json"
    assert reason("wearables", b"p", good % (b'"fast"', b"bpm")) == "invalid_schema"
    assert reason("wearables", b"q", good % (b"60", b"bpm")) == "key_mismatch"
    assert reason("wearables", None, good % (b"60", b"bpm")) == "key_mismatch"
    assert reason("wearables", b"p", good % (b"60", b"mmHg")) == "unknown_unit"
    assert reason("wearables", b"p", good % (b"900", b"bpm")) == "implausible_value"
    assert reason("labs", b"p", good % (b"60", b"bpm")) == "wrong_source"
    future = good.replace(b"2026-03-01", b"2999-03-01") % (b"60", b"bpm")
    assert reason("wearables", b"p", future) == "future_time"
    ancient = good.replace(b"2026-03-01", b"1900-03-01") % (b"60", b"bpm")
    assert reason("wearables", b"p", ancient) == "ancient_time"
    naive = good.replace(b"00:00:00Z", b"00:00:00") % (b"60", b"bpm")
    assert reason("wearables", b"p", naive) == "invalid_schema"
    observation = validate_observation(
        "wearables", b"p", good % (b"61", b"beats/min"), origin, CATALOGUE, SETTINGS
    )
    assert observation.value == 61.0 and observation.unit == "bpm"


def test_long_follow_up_seals_old_evidence_and_refuses_too_late_exposure_changes():
    """300 readings over 300 days: old readings are sealed (the state stays
    bounded) and the statistics still equal the batch computation; an exposure
    change older than the sealed evidence is dead-lettered, not silently applied."""
    programme = build_programme(
        ["resting_heart_rate"], num_patients=3, num_cohorts=1, obs_per_patient=300,
        time_span=300.0, design="crossover", seed=9, start=datetime(2025, 1, 1, tzinfo=UTC),
    )  # fmt: skip
    accepted, rejected = ingest(programme, programme.send_order())
    assert not rejected
    records, reasons, _ = run_state(accepted)
    patients = sorted(programme.truth.patients)
    expected = programme.expected_statistics(
        "resting_heart_rate", MODELS["resting_heart_rate"], patients
    )
    for i, patient in enumerate(patients):
        stats = records[patient].measures["resting_heart_rate"]
        assert len(stats.recent) <= 2 * RECENT_KEEP
        assert stats.sealed_until > days(programme.truth.start)
        np.testing.assert_allclose(
            stacked([stats.gram], expected.gram.shape[1:])[0],
            expected.gram[i],
            rtol=1e-10,
            atol=1e-8,
        )
    assert not reasons
    assert_recent_window_is_batch(records, patients, "resting_heart_rate", programme)

    patient = patients[0]
    sealed_until = records[patient].measures["resting_heart_rate"].sealed_until
    late = ExposureChange(
        event_id="late-stop",
        event_time=datetime.fromtimestamp((sealed_until - 1.0) * 86400.0, UTC),
        patient_id=patient,
        exposure=0.0,
    )
    event = EnrollmentRecord(
        event=late, origin=Origin(topic="enrollments", partition=0, offset=10**6)
    )
    record, outcome = apply_event(records[patient], event, MODELS)
    assert [reason for _, reason, _ in outcome.rejected] == ["late_exposure_change"]
    assert record.timeline == records[patient].timeline
    assert record.measures == records[patient].measures


def test_a_record_saved_without_window_statistics_waits_until_its_gap_weighs_nothing():
    """A record from before the recent window existed (or whose half-life
    changed) lacks the window statistics of its sealed readings: no recent-window
    evidence for it until those readings are 7 half-lives old, then the window
    statistics equal the batch computation up to their weight (< 2^-7)."""
    programme = build_programme(
        ["resting_heart_rate"], num_patients=1, num_cohorts=1, obs_per_patient=300,
        time_span=300.0, design="crossover", seed=9, start=datetime(2025, 1, 1, tzinfo=UTC),
    )  # fmt: skip
    accepted, _ = ingest(programme, programme.send_order())
    records, _, _ = run_state(accepted)
    (patient,) = programme.truth.patients
    # A 14-day window: 7 half-lives (98 days) reach past the sealed readings
    # (sealed_until is 64 readings = 64 days before the latest).
    models = {m: c.model_copy(update={"recent_half_life": 14.0}) for m, c in MODELS.items()}
    model = models["resting_heart_rate"]
    legacy = records[patient].model_copy(deep=True)
    stats = legacy.measures["resting_heart_rate"]
    assert stats.sealed_gram is not None
    stats.sealed_window_gram, stats.sealed_window_half_life = None, None
    assert recent_window_stats(legacy, stats, model) is None

    # Readings continue daily for 60 more days: the gap is then > 98 days old.
    last = max(r.event_time for r in accepted if isinstance(r, Observation))
    record, later = legacy, []
    for day in range(1, 61):
        event = Observation(
            event_id=f"later-{day}", event_time=last + timedelta(days=day), patient_id=patient,
            measure="resting_heart_rate", value=70.0 + (day % 5), unit="bpm", source="wearable",
            origin=Origin(topic="wearables", partition=0, offset=10**6 + day),
        )  # fmt: skip
        record, _ = apply_event(record, event, models)
        later.append(event)
    stats = record.measures["resting_heart_rate"]
    window = recent_window_stats(record, stats, model)
    assert window is not None
    readings = [r for r in accepted if isinstance(r, Observation)] + later
    times = np.array([days(r.event_time) for r in readings])
    expected = stats_from_events(
        1, np.zeros(len(readings), dtype=np.int64), np.array([record.exposure_at(t) for t in times]),
        times, np.array([r.value for r in readings]), model.recent_window,
    )  # fmt: skip
    np.testing.assert_allclose(window.gram[0], expected.gram[0], rtol=2**-7, atol=1e-6)


def test_handing_the_record_over_gives_the_same_state_and_copying_leaves_it_alone(programme):
    """apply_event(copy=False), as the agent uses it on a record it has just
    parsed, modifies and returns that record and ends in the same state as the
    copying path, which never modifies its input."""
    accepted, _ = ingest(programme, programme.send_order())
    copied: dict[str, PatientRecord] = {}
    handed: dict[str, PatientRecord] = {}
    for event in accepted:
        patient = event.patient_id
        before = copied.get(patient)
        frozen = None if before is None else before.model_dump_json()
        copied[patient], _ = apply_event(before, event, MODELS)
        if before is not None:
            assert before.model_dump_json() == frozen  # the input is untouched
        current = handed.get(patient)
        handed[patient], _ = apply_event(current, event, MODELS, copy=False)
        if current is not None:
            assert handed[patient] is current
    assert {p: r.model_dump_json() for p, r in handed.items()} == {
        p: r.model_dump_json() for p, r in copied.items()
    }


def test_the_event_ids_kept_are_bounded_and_an_offset_reset_is_still_a_replay():
    """A patient followed for 4·SEEN_KEEP readings keeps SEEN_KEEP event ids;
    reading the whole partition again from offset 0 (a consumer-group reset, a
    backfill into a worker with state) changes nothing, every event a replay; a
    producer duplicate of a recent event (another origin) is dead-lettered; one
    of an event whose id was forgotten is applied (the documented limit)."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    enrolment = EnrollmentRecord(
        event=Enrollment(event_id="enrol", event_time=start, patient_id="p", cohort="c"),
        origin=Origin(topic="enrollments", partition=0, offset=0),
    )
    readings = [
        Observation(
            event_id=f"r{k}",
            event_time=start + timedelta(hours=k + 1),
            patient_id="p",
            measure="resting_heart_rate",
            value=60.0 + k % 7,
            unit="bpm",
            source="wearable",
            origin=Origin(topic="wearables", partition=2, offset=k),
        )
        for k in range(4 * SEEN_KEEP)
    ]
    record, _ = apply_event(None, enrolment, MODELS)
    for reading in readings:
        record, outcome = apply_event(record, reading, MODELS)
        assert outcome.touched and not outcome.replays
    record = PatientRecord.model_validate_json(record.model_dump_json())  # as stored
    assert len(record.seen_origins()) == SEEN_KEEP
    assert record.forgotten == {"enrollments:0": 0, "wearables:2": 3 * SEEN_KEEP - 1}
    before = record.measures["resting_heart_rate"].model_dump()

    replays = 0
    for event in [enrolment, *readings]:
        record, outcome = apply_event(record, event, MODELS)
        assert not outcome.touched and not outcome.rejected
        replays += outcome.replays
    assert replays == 1 + len(readings)
    assert record.measures["resting_heart_rate"].model_dump() == before

    elsewhere = Origin(topic="wearables", partition=2, offset=10 * SEEN_KEEP)
    recent = readings[-1].model_copy(update={"origin": elsewhere})
    record, outcome = apply_event(record, recent, MODELS)
    assert [reason for _, reason, _ in outcome.rejected] == ["duplicate"]
    old = readings[0].model_copy(update={"origin": elsewhere})
    record, outcome = apply_event(record, old, MODELS)
    assert outcome.touched == {"resting_heart_rate"} and not outcome.rejected


OLD_RECORDS = Path(__file__).parent / "data" / "patient_records" / "e7725ef.json"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode()


def test_a_score_stored_as_a_string_by_an_earlier_version_is_still_served() -> None:
    """``published_score`` (the score's JSON as a string) is read into
    ``published_score_json``, the same bytes, and written only there."""
    score = '{"schema_version":1,"patient_id":"p-1","note":"quotes \\" and ü"}'
    old = json.dumps({"patient_id": "p-1", "published_score": score})
    record = PatientRecord.model_validate_json(old)
    assert record.published_score_json == score.encode()
    written = json.loads(record.model_dump_json())
    assert "published_score" not in written
    assert base64.urlsafe_b64decode(written["published_score_json"]) == score.encode()
    assert PatientRecord.model_validate_json(record.model_dump_json()) == record
    both = json.dumps(
        {"patient_id": "p-1", "published_score": score, "published_score_json": _b64(b"{}")}
    )
    assert PatientRecord.model_validate_json(both).published_score_json == b"{}"


def test_records_written_by_earlier_versions_still_read() -> None:
    """A worker started on a changelog written by an earlier version (the event
    ids and origins as a JSON object, ``seen``; statistics as nested lists) reads
    every record: the same fields, the same origins remembered in the same order,
    written back in the packed forms (``seen_index``; the statistics as float64
    bytes, the same floats), and its de-duplication index still tells a
    replay from a duplicate. The fixture (its ``how`` says what it holds) was
    written by::

        records = benchmarks.state_scale.simulated_records(2, 150, seed=11)
        enrolled = next(iter(records.values()))  # .model_dump_json()
        # and a patient's 3 readings per measure applied without its enrolment
    """
    stored = json.loads(OLD_RECORDS.read_text())["records"]
    for raw in stored:
        record = PatientRecord.model_validate_json(raw)
        plain = json.loads(raw)  # the stored form, read without the model
        assert record.seen_origins() == list(plain.pop("seen").values())
        written = json.loads(record.model_dump_json())
        partitions = [origin.rsplit(":", 1)[0] for origin in record.seen_origins()]
        assert written.pop("seen_partitions") == list(dict.fromkeys(partitions))
        assert len(base64.urlsafe_b64decode(written.pop("seen_index"))) == 18 * len(
            record.seen_origins()
        )
        assert written.pop("published_joint") == {}  # joint groups came after e7725ef
        score, packed = plain.pop("published_score"), written.pop("published_score_json")
        assert packed == (None if score is None else _b64(score.encode()))
        for stats in plain["measures"].values():  # statistics as lists: now packed float64
            for name in ("gram", "sealed_gram", "sealed_window_gram", "window_gram"):
                if stats.get(name) is not None:
                    stats[name] = _b64(np.asarray(stats[name], dtype="<f8").tobytes())
        assert written == plain  # every other field as it was
        again = PatientRecord.model_validate_json(record.model_dump_json())
        assert again == record and again.seen_origins() == record.seen_origins()
    enrolled = PatientRecord.model_validate_json(stored[0])
    assert len(enrolled.seen_origins()) == SEEN_KEEP and enrolled.forgotten
    event_id, at = next(reversed(json.loads(stored[0])["seen"].items()))
    topic, partition, offset = at.rsplit(":", 2)
    measure = next(iter(enrolled.measures))

    def reading(partition: int) -> Observation:
        return Observation(
            event_id=event_id, event_time=enrolled.measures[measure].last_event_time,
            patient_id=enrolled.patient_id, measure=measure, value=1.0,
            unit=CATALOGUE.get(measure).unit, source="lab",
            origin=Origin(topic=topic, partition=partition, offset=int(offset)),
        )  # fmt: skip

    _, replay = apply_event(enrolled, reading(int(partition)), MODELS)
    assert (replay.replays, replay.touched, replay.rejected) == (1, set(), [])
    _, duplicate = apply_event(enrolled, reading(int(partition) + 1), MODELS)
    assert [reason for _, reason, _ in duplicate.rejected] == ["duplicate"]
    pending = PatientRecord.model_validate_json(stored[1])
    assert not pending.enrolled and len(pending.pending) == 9
