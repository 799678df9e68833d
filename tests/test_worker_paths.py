"""Paths of the real worker that the other broker tests do not reach (issue 19,
item 6), from one worker subprocess on the real broker:

- **drift**: a crossover programme whose population effect of resting heart rate
  changes mid-stream (-3.6 -> +4 bpm per unit exposure, every patient at once,
  at 67.5 days) is published in event-time order, one chunk at a time, each
  chunk once the posterior covering the previous ones is out (so the worker
  fits a sequence of posteriors over the stream, as it would in production,
  instead of one at the end). The population agent must raise a
  ``posterior_shift`` and a ``window_shift`` alert after the change and none
  before it, and after every posterior that asks for it (``rescore``) every
  patient with evidence must get a new score under that version;
- **a stationary run**: HbA1c, the programme's second measure, has a constant
  effect through the same run: its posteriors (fitted, judged and alerted on
  independently of the first measure's) raise no drift alert at all;
- **not_enrolled overflow**: readings of a patient never enrolled are held up to
  ``MAX_PENDING``; beyond that they are dead-lettered ``not_enrolled`` with
  their origin and original bytes; the held ones are applied when the
  enrolment arrives;
- **a late reading older than the sealed evidence**: it is folded into the
  sealed statistics with its exposure from the timeline, so the patient's
  statistics (all-time and recent-window) still equal the batch computation
  over the unique readings; an exposure change that old is dead-lettered
  ``late_exposure_change`` (streams/patient_state.py);
- **every output topic** (scores, deadletter, alerts, population-posterior)
  validated record by record against the JSON Schemas
  ``efficacy schemas --out DIR`` exports, with the jsonschema package.

The two special patients report sleep minutes, a measure no other patient has:
with fewer than ``population_min_patients`` patients it never gets a
population posterior, so they leave the drift checks untouched.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections import Counter, defaultdict
from datetime import datetime, timedelta
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from settling import latest_by_key, poll

from cli.kafka_io import produce, read_to_end, read_until
from cli.main import main as efficacy
from cli.programme import DEFAULT_START, Programme, build_programme
from cli.simulate import publish
from cli.worker_process import READY, WorkerProcess
from model.evidence import stacked, stats_from_events
from streams.app import measure_models
from streams.catalogue import Catalogue
from streams.patient_state import MAX_PENDING, PatientRecord, days, recent_window_stats
from streams.schemas import Enrollment, ExposureChange, WearableReading
from streams.settings import Settings

pytestmark = pytest.mark.kafka

DRIFTING = "resting_heart_rate"  # effect -3.6 -> +4 bpm mid-stream
STEADY = "hba1c"  # constant effect all along
SIDE = "sleep_minutes"  # only the two special patients report it
CHUNKS = 12
PARTITIONS = 4
# structure-selection is not here: a selection compiles four structures' fits
# (minutes on two shared cores); tests/test_worker_metrics.py runs one.
OUTPUTS = ("scores", "deadletter", "alerts", "population-posterior")
GHOST = "ghost-patient"  # never enrolled until the overflow is checked
LATE = "late-patient"  # a reading arrives after older ones were sealed
LATE_READINGS = 150  # daily: > 2 * RECENT_KEEP, so the oldest are sealed
LATE_DAY = 10.25  # the late reading's day (after enrolment), well inside the sealed part
EXPOSURE_DAY = 40.0  # the late patient's exposure starts here


def worker_env(bootstrap: str, prefix: str, data_dir: Path) -> dict[str, str]:
    return {
        "EFFICACY_BOOTSTRAP_SERVERS": bootstrap,
        "EFFICACY_TOPIC_PREFIX": prefix,
        "EFFICACY_APP_ID": prefix.rstrip("."),
        "EFFICACY_PARTITIONS": str(PARTITIONS),
        "EFFICACY_WEB_ENABLED": "false",
        "EFFICACY_METRICS_PORT": "0",
        "EFFICACY_DATA_DIR": str(data_dir),
    }


def in_chunks(programme: Programme, count: int) -> list[Programme]:
    """The readings in send order (event time) cut into ``count`` programmes;
    the first also carries every enrolment and exposure change."""
    ordered = programme.send_order()
    enrolments = [r for r in ordered if r.topic == "enrollments"]
    readings = ordered[len(enrolments) :]
    n = len(readings)
    parts = []
    for k in range(count):
        records = (enrolments if k == 0 else []) + readings[k * n // count : (k + 1) * n // count]
        grouped = {t: [r for r in records if r.topic == t] for t in programme.records}
        parts.append(Programme(grouped, programme.truth, programme.simulated))
    return parts


def valid_readings(programme: Programme) -> Counter[str]:
    return Counter(r.measure for rs in programme.records.values() for r in rs if r.label == "valid")


def patient_states(bootstrap: str, app_id: str) -> dict[str, PatientRecord]:
    changelog = asyncio.run(read_to_end(bootstrap, f"{app_id}-patients-changelog"))
    return {
        json.loads(key): PatientRecord.model_validate_json(record.value)
        for key, record in latest_by_key(changelog).items()
        if record.value  # faust JSON-encodes the keys
    }


def reading(patient: str, event_id: str, day: float, value: float) -> bytes:
    return (
        WearableReading(
            event_id=event_id,
            event_time=DEFAULT_START + timedelta(days=day),
            patient_id=patient,
            measure=SIDE,
            value=value,
            unit="min",
        )
        .model_dump_json()
        .encode()
    )


def enrolment(patient: str, event_id: str, day: float) -> bytes:
    event = Enrollment(
        event_id=event_id,
        event_time=DEFAULT_START + timedelta(days=day),
        patient_id=patient,
        cohort="clinic-special",
    )
    return event.model_dump_json().encode()


def exposure_change(patient: str, event_id: str, day: float) -> bytes:
    event = ExposureChange(
        event_id=event_id,
        event_time=DEFAULT_START + timedelta(days=day),
        patient_id=patient,
        exposure=1.0,
    )
    return event.model_dump_json().encode()


def side_statistics(readings: list[tuple[float, float, float]], window: bool = False):
    """Batch computation over (day, exposure, value) readings of one patient."""
    model = measure_models(Catalogue.load(), Settings())[SIDE]
    model = model.recent_window if window else model
    day, exposure, value = (np.array(column) for column in zip(*readings, strict=True))
    start = days(DEFAULT_START)
    return stats_from_events(
        1, np.zeros(day.size, dtype=np.int64), exposure, start + day, value, model
    )


@pytest.fixture(scope="module")
def run(kafka_bootstrap, tmp_path_factory):
    """One worker; the special patients first, then the drifting programme chunk
    by chunk. Returns what every test reads."""
    prefix = f"paths-{uuid.uuid4().hex[:8]}."
    app_id = prefix.rstrip(".")
    settings = Settings(bootstrap_servers=kafka_bootstrap, topic_prefix=prefix,
                        partitions=PARTITIONS, app_id=app_id)  # fmt: skip
    programme = build_programme(
        [DRIFTING, STEADY], num_patients=200, num_cohorts=6, obs_per_patient=30,
        design="crossover", seed=3, bad_fraction=0.01, duplicate_fraction=0.01,
        spec_overrides={DRIFTING: {"effect_change_at": 0.5, "effect_after_change": 4.0}},
    )  # fmt: skip
    rng = np.random.default_rng(19)
    out: dict = {"prefix": prefix, "programme": programme}
    with WorkerProcess(worker_env(kafka_bootstrap, prefix, tmp_path_factory.mktemp("w"))) as worker:
        worker.wait_for_log(READY, timeout=180)
        wearables = prefix + "wearables"

        # --- not_enrolled: MAX_PENDING + 5 readings of a patient never enrolled
        ghost = [
            (GHOST.encode(), reading(GHOST, f"ghost-{i}", 1.0 + i / 100, 420 + 30 * rng.normal()))
            for i in range(MAX_PENDING + 5)
        ]
        asyncio.run(produce(kafka_bootstrap, wearables, ghost))
        letters = asyncio.run(read_until(kafka_bootstrap, [prefix + "deadletter"],
                                         done=lambda rs: len(rs) >= 5, timeout=120))  # fmt: skip
        out["ghost_letters"] = [json.loads(r.value) for r in letters]
        sent = [
            r
            for r in asyncio.run(read_to_end(kafka_bootstrap, wearables))
            if r.key == GHOST.encode()
        ]
        out["ghost_sent"] = sorted(sent, key=lambda r: r.offset)
        asyncio.run(produce(kafka_bootstrap, prefix + "enrollments",
                            [(GHOST.encode(), enrolment(GHOST, "ghost-enr", 0.5))]))  # fmt: skip

        # --- a late reading: enrolled, exposed from EXPOSURE_DAY, daily readings
        late = [(0.5 + i, float(0.5 + i >= EXPOSURE_DAY), 420 + 25 * (0.5 + i >= EXPOSURE_DAY)
                 + 30 * rng.normal()) for i in range(LATE_READINGS)]  # fmt: skip
        asyncio.run(produce(kafka_bootstrap, prefix + "enrollments", [
            (LATE.encode(), enrolment(LATE, "late-enr", 0.0)),
            (LATE.encode(), exposure_change(LATE, "late-exp", EXPOSURE_DAY)),
        ]))  # fmt: skip

        def enrolled():  # before its readings: an exposure change must not come late
            state = patient_states(kafka_bootstrap, app_id).get(LATE)
            return state is not None and len(state.timeline) == 2

        assert poll(enrolled, timeout=120), "the late patient was not enrolled in 120 s"
        asyncio.run(produce(kafka_bootstrap, wearables, [
            (LATE.encode(), reading(LATE, f"late-{i}", day, value))
            for i, (day, _, value) in enumerate(late)
        ]))  # fmt: skip

        def late_state(count: int):
            state = patient_states(kafka_bootstrap, app_id).get(LATE)
            stats = state and state.measures.get(SIDE)
            ready = stats and stats.count_exposed + stats.count_unexposed == count
            return state if ready else None

        out["late_sealed"] = poll(lambda: late_state(LATE_READINGS), timeout=120)
        assert out["late_sealed"], "the late patient's readings were not applied in 120 s"
        value = 420 + 30 * rng.normal()
        late.append((LATE_DAY, 0.0, value))
        out["late_readings"] = late
        asyncio.run(produce(kafka_bootstrap, wearables,
                            [(LATE.encode(), reading(LATE, "late-late", LATE_DAY, value))]))  # fmt: skip
        # An exposure change that old would change sealed readings: refused.
        out["late_change"] = exposure_change(LATE, "late-exp-2", 5.0)
        asyncio.run(produce(kafka_bootstrap, prefix + "enrollments",
                            [(LATE.encode(), out["late_change"])]))  # fmt: skip

        # --- the programme, chunk by chunk
        posterior_topic = prefix + "population-posterior"
        boundaries = []  # (valid readings of each measure so far, last event time)
        so_far: Counter[str] = Counter()
        for chunk in in_chunks(programme, CHUNKS):
            so_far += valid_readings(chunk)
            target = {m: so_far[m] for m in (DRIFTING, STEADY)}
            asyncio.run(publish(chunk, settings))

            def covered(records, target=target) -> bool:
                seen = defaultdict(set)
                for r in records:
                    message = json.loads(r.value)
                    seen[message["measure"]].add(round(message["num_observations"]))
                return all(n in seen[m] for m, n in target.items())

            records = asyncio.run(read_until(kafka_bootstrap, [posterior_topic], covered, 300))
            assert covered(records), worker.log_tail()
            last = max(r.event_time for rs in chunk.records.values() for r in rs)
            boundaries.append((target, last))
        out["boundaries"] = boundaries

        # The last rescore done: every patient scored under the latest posterior
        # that asked for it, or a later one.
        def finished(records) -> bool:
            rescore = max((json.loads(r.value)["version"] for r in records
                           if r.topic == posterior_topic and json.loads(r.value)["rescore"]
                           and json.loads(r.value)["measure"] == DRIFTING), default=None)  # fmt: skip
            rescored = {
                s["patient_id"]
                for s in (json.loads(r.value) for r in records if r.topic == prefix + "scores")
                for m in s["measures"]
                if m["measure"] == DRIFTING and rescore and m["population_version"] >= rescore
            }
            return rescored >= set(programme.truth.patients)

        asyncio.run(
            read_until(kafka_bootstrap, [posterior_topic, prefix + "scores"], finished, 300)
        )
        out["states"] = patient_states(kafka_bootstrap, app_id)
        out["outputs"] = {t: asyncio.run(read_to_end(kafka_bootstrap, prefix + t)) for t in OUTPUTS}
        out["log"] = worker.log_tail(80)
        assert worker.stop() == 0, out["log"]
    return out


def posteriors_of(run, measure: str) -> list[dict]:
    messages = [json.loads(r.value) for r in run["outputs"]["population-posterior"]]
    return sorted((m for m in messages if m["measure"] == measure), key=lambda m: m["version"])


def drift_alerts(run, measure: str) -> dict[int, dict]:
    alerts = (json.loads(r.value) for r in run["outputs"]["alerts"])
    return {
        a["population_version"]: a
        for a in alerts
        if a["kind"] == "drift" and a["measure"] == measure
    }


# --- drift ---------------------------------------------------------------------------


def test_a_mid_stream_change_raises_posterior_and_window_shift_alerts(run):
    programme = run["programme"]
    change_days = programme.simulated[DRIFTING].truth.change_time
    change = programme.truth.start + timedelta(days=change_days)
    # Posteriors fitted on readings that all precede the change: the chunks sent
    # before the first chunk reaching past it (the next is sent only once the
    # posterior covering these exists, so a posterior counting no more
    # readings saw nothing after the change).
    before = max(target[DRIFTING] for target, last in run["boundaries"] if last < change)
    posteriors = posteriors_of(run, DRIFTING)
    alerts = drift_alerts(run, DRIFTING)
    for posterior in posteriors:
        summary = (posterior["version"], posterior["drift_kinds"], posterior["drift"])
        if round(posterior["num_observations"]) <= before:
            assert not posterior["drift_detected"], f"a false alarm before the change: {summary}"
        # Every drift verdict is an alert on the alerts topic, keyed by measure.
        assert (posterior["version"] in alerts) == posterior["drift_detected"], summary
    kinds = {kind: [p["version"] for p in posteriors if kind in p["drift_kinds"]]
             for kind in ("posterior_shift", "window_shift")}  # fmt: skip
    print(f"change after {before} readings; alerts by version: {kinds}")
    assert kinds["posterior_shift"] and kinds["window_shift"], kinds
    for version in kinds["posterior_shift"] + kinds["window_shift"]:
        alert = alerts[version]
        assert alert["event_id"] == f"drift:{DRIFTING}:{version}" and alert["severity"] == "warning"
    # The statistics the alerts report cross their thresholds (monitoring.drift
    # defaults: |shift_z| > 3.5 or location KL > 12; |window shift| > 3).
    for version in kinds["posterior_shift"]:
        s = alerts[version]["statistics"]
        assert abs(s["shift_z"]) > 3.5 or s["kl_location"] > 12.0, s
    for version in kinds["window_shift"]:
        assert abs(alerts[version]["statistics"]["window_shift"]) > 3.0


def test_every_patient_is_rescored_under_each_posterior_that_asks_for_it(run):
    """After a drifting posterior (``rescore``: it moved materially) every
    patient with evidence gets a new score under that version, not only those
    whose next readings would have rescored them anyway."""
    posteriors = posteriors_of(run, DRIFTING)
    by_version = defaultdict(set)  # version -> patients with a score under it
    for record in run["outputs"]["scores"]:
        score = json.loads(record.value)
        for measure in score["measures"]:
            if measure["measure"] == DRIFTING:
                by_version[measure["population_version"]].add(score["patient_id"])
    readers = defaultdict(set)  # readings of DRIFTING so far -> patients with any
    so_far = 0
    for record in run["programme"].send_order():
        if record.label == "valid" and record.measure == DRIFTING:
            so_far += 1
            readers[so_far] = readers[so_far - 1] | {record.patient_id}
    drifted = [p for p in posteriors if p["drift_detected"]]
    assert drifted and all(p["rescore"] for p in drifted if "posterior_shift" in p["drift_kinds"])
    for posterior in (p for p in posteriors if p["rescore"]):
        version, counted = posterior["version"], round(posterior["num_observations"])
        # Patients the posterior counted: at least those with readings before the
        # chunk boundary it reached (send order is event order within a topic).
        boundary = max((t[DRIFTING] for t, _ in run["boundaries"] if t[DRIFTING] <= counted),
                       default=0)  # fmt: skip
        missing = readers[boundary] - by_version[version]
        assert not missing, (
            f"v{version}: {len(missing)} patients not rescored, e.g. {sorted(missing)[:3]}"
        )
        assert len(by_version[version]) >= posterior["num_patients"]


def test_a_stationary_measure_raises_no_drift_alert_in_a_whole_run(run):
    """Its own posterior sequence, judged by its own detectors, over the whole
    run. The thresholds (monitoring.drift.DriftConfig) put a false alarm at
    ~0.05-0.4% per comparison under exact Bayes: with ~20 comparisons an alert
    here would be a ~5% event, and the seed is fixed."""
    posteriors = posteriors_of(run, STEADY)
    assert len(posteriors) >= CHUNKS  # a posterior per chunk at least
    assert posteriors[-1]["num_patients"] == 200
    for posterior in posteriors:
        assert not posterior["drift_detected"], (posterior["version"], posterior["drift"])
    assert drift_alerts(run, STEADY) == {}
    conflicts = [json.loads(r.value) for r in run["outputs"]["alerts"]]
    conflicts = [
        a for a in conflicts if a["kind"] == "prior_data_conflict" and a["measure"] == STEADY
    ]
    print(f"{STEADY}: {len(posteriors)} posteriors, no drift alert; "
          f"{len(conflicts)} prior-data conflict alerts")  # fmt: skip


# --- not_enrolled overflow -------------------------------------------------------------


def test_readings_beyond_max_pending_are_dead_lettered_and_the_rest_applied_on_enrolment(run):
    sent = run["ghost_sent"]
    assert len(sent) == MAX_PENDING + 5
    letters = [d for d in run["ghost_letters"] if d["reason"] == "not_enrolled"]
    # The overflow: exactly the records after the first MAX_PENDING, each with
    # its origin and original bytes.
    overflow = sent[MAX_PENDING:]
    assert sorted((d["source_topic"], d["partition"], d["offset"]) for d in letters) == [
        (r.topic, r.partition, r.offset) for r in overflow
    ]
    by_offset = {d["offset"]: d for d in letters}
    for record in overflow:
        letter = by_offset[record.offset]
        assert base64.b64decode(letter["value_b64"]) == record.value
        assert base64.b64decode(letter["key_b64"]) == GHOST.encode()
    # The first MAX_PENDING, held until the enrolment, are now the statistics.
    state = run["states"][GHOST]
    assert state.enrolled and state.pending == []
    held = [json.loads(r.value) for r in sent[:MAX_PENDING]]
    start = days(DEFAULT_START)
    expected = side_statistics([(days_of(h) - start, 0.0, h["value"]) for h in held])
    stats = state.measures[SIDE]
    assert (stats.count_unexposed, stats.count_exposed) == (MAX_PENDING, 0)
    np.testing.assert_allclose(
        stacked([stats.gram], expected.gram.shape[1:])[0], expected.gram[0], rtol=1e-9, atol=1e-8
    )


def days_of(message: dict) -> float:
    return days(datetime.fromisoformat(message["event_time"]))


# --- a late reading --------------------------------------------------------------------


def test_a_reading_older_than_the_sealed_evidence_still_counts_exactly_once(run):
    sealed = run["late_sealed"].measures[SIDE]
    late_time = days(DEFAULT_START) + LATE_DAY
    # The path under test: the reading is older than what was sealed.
    assert sealed.sealed_gram is not None and late_time < sealed.sealed_until
    state = run["states"][LATE]
    stats = state.measures[SIDE]
    readings = run["late_readings"]
    expected = side_statistics(readings)
    assert (stats.count_exposed, stats.count_unexposed) == (
        int(expected.count_exposed[0]), int(expected.count_unexposed[0]))  # fmt: skip
    np.testing.assert_allclose(
        stacked([stats.gram], expected.gram.shape[1:])[0], expected.gram[0], rtol=1e-9, atol=1e-8
    )
    # The recent-window statistics the drift monitor fits equal the batch
    # computation under the window's forgetting, the late reading included.
    model = measure_models(Catalogue.load(), Settings())[SIDE]
    window = recent_window_stats(state, stats, model)
    np.testing.assert_allclose(window.gram[0], side_statistics(readings, window=True).gram[0],
                               rtol=1e-9, atol=1e-10)  # fmt: skip


def test_an_exposure_change_older_than_the_sealed_evidence_is_dead_lettered(run):
    letters = [json.loads(r.value) for r in run["outputs"]["deadletter"]]
    [letter] = [d for d in letters if d["reason"] == "late_exposure_change"]
    assert letter["source_topic"] == run["prefix"] + "enrollments"
    assert base64.b64decode(letter["value_b64"]) == run["late_change"]
    # ... and the timeline is as before: enrolment (unexposed), then EXPOSURE_DAY.
    start = days(DEFAULT_START)
    assert run["states"][LATE].timeline == [(start, 0.0), (start + EXPOSURE_DAY, 1.0)]


# --- output contracts ------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported_schemas(tmp_path_factory) -> dict[str, dict]:
    """The JSON Schemas as ``efficacy schemas --out DIR`` writes them for producers
    and consumers in other languages."""
    folder = tmp_path_factory.mktemp("schemas")
    assert efficacy(["schemas", "--out", str(folder)]) == 0
    return {path.name.removesuffix(".schema.json"): json.loads(path.read_text())
            for path in folder.glob("*.schema.json")}  # fmt: skip


def test_every_output_record_matches_the_exported_json_schema(run, exported_schemas):
    """Every record the worker wrote to an output topic, against the exported
    schema (jsonschema, Draft 2020-12 as pydantic emits), not against the
    pydantic model that generated it."""
    counts = {}
    for topic in OUTPUTS:
        schema = exported_schemas[topic]
        validator = jsonschema.Draft202012Validator(
            schema, format_checker=jsonschema.FormatChecker()
        )
        records = run["outputs"][topic]
        assert records, f"the worker wrote nothing to {topic}"
        for record in records:
            problems = [
                f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                for e in validator.iter_errors(json.loads(record.value))
            ]
            assert not problems, f"{topic} offset {record.offset}: {problems[:3]}"
        counts[topic] = len(records)
    kinds = Counter(json.loads(r.value)["kind"] for r in run["outputs"]["alerts"])
    reasons = Counter(json.loads(r.value)["reason"] for r in run["outputs"]["deadletter"])
    print(f"validated {counts}; alerts {dict(kinds)}; dead letters {dict(reasons)}")
    # Each kind of record was exercised, not only the commonest.
    assert set(kinds) == {"transition", "drift", "prior_data_conflict"}, kinds
    assert {"duplicate", "not_enrolled", "late_exposure_change", "malformed_json"} <= set(reasons)
