"""FHIR Observations and Open mHealth data points through a real worker on the
real broker (streams.agents.interop): enrolled patients' heart rates and
blood pressures, sent one by one, in a Bundle, as a panel and as data points,
reach the patients' scores (counted once each); every bad record is on the
dead-letter topic with its reason, its original bytes and where it was read.

The resources are the real examples of tests/data (interop_examples), given
the enrolled patients as subject, recent times and their own ids.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from interop_examples import (
    BLOOD_PRESSURE,
    GLUCOSE,
    HEART_RATE,
    bundle,
    encode,
    fhir_resource,
    omh_point,
)
from settling import latest_by_key

from cli.kafka_io import produce, read_to_end, read_until
from cli.worker_process import READY, WorkerProcess
from streams.schemas import Enrollment

pytestmark = pytest.mark.kafka

PATIENTS = ["fhir-p1", "fhir-p2", "fhir-p3"]
START = datetime.now(UTC).replace(microsecond=0) - timedelta(days=30)
FHIR_TOPIC, OMH_TOPIC = "fhir-observations", "omh-datapoints"
OMH_HR = "heart-rate-2.0-with-temporal-relationship-to-sleep.json"
OMH_BP = "blood-pressure-4.0-blood-pressure-only.json"


def heart_rate(patient: str, n: int, value: float) -> dict:
    resource = copy.deepcopy(fhir_resource(HEART_RATE))
    resource.update(
        id=f"hr-{patient}-{n}", effectiveDateTime=(START + timedelta(days=n)).isoformat()
    )
    resource["subject"]["reference"] = f"Patient/{patient}"
    resource["valueQuantity"]["value"] = value
    return resource


def panel(patient: str, n: int, systolic: float) -> dict:
    resource = copy.deepcopy(fhir_resource(BLOOD_PRESSURE))
    resource.update(
        id=f"bp-{patient}-{n}", effectiveDateTime=(START + timedelta(days=n)).isoformat()
    )
    del resource["identifier"]  # the example's identifier would make every panel one event
    resource["subject"]["reference"] = f"Patient/{patient}"
    resource["component"][0]["valueQuantity"]["value"] = systolic
    return resource


def data_point(name: str, patient: str, n: int, change) -> dict:
    point = omh_point(name, user_id=patient, id=f"omh-{patient}-{name[:10]}-{n}")
    point["body"]["effective_time_frame"] = {"date_time": (START + timedelta(days=n)).isoformat()}
    change(point["body"])
    return point


def good_records(patient: str, k: int) -> tuple[list[bytes], list[bytes], Counter[str]]:
    """(FHIR records, OMH records, expected readings per measure) of a patient."""
    fhir_records = [
        encode(heart_rate(patient, 1, 60.0 + k)),
        encode(heart_rate(patient, 2, 62.0 + k)),
        encode(
            bundle(
                heart_rate(patient, 3, 61.0 + k),
                heart_rate(patient, 4, 63.0 + k),
                panel(patient, 4, 128.0 + k),
            )
        ),
        encode(panel(patient, 5, 131.0 + k)),
    ]
    omh_records = [
        encode(data_point(OMH_HR, patient, 6, lambda b: b["heart_rate"].update(value=59.0 + k))),
        encode(data_point(OMH_HR, patient, 7, lambda b: b["heart_rate"].update(value=64.0 + k))),
        encode(data_point(OMH_BP, patient, 8,
                          lambda b: b["systolic_blood_pressure"].update(value=126.0 + k))),
    ]  # fmt: skip
    return fhir_records, omh_records, Counter(resting_heart_rate=6, systolic_bp=3)


def bad_records() -> list[tuple[str, bytes, str]]:
    """(topic, bytes, reason) of records that must be dead-lettered."""
    patient = PATIENTS[0]
    unknown_unit = heart_rate(patient, 9, 61.0)
    unknown_unit["valueQuantity"]["code"] = "mm[Hg]"
    no_subject = heart_rate(patient, 10, 61.0)
    del no_subject["subject"]
    glucose = fhir_resource(GLUCOSE)
    glucose["subject"]["reference"] = f"Patient/{patient}"
    no_user = data_point(OMH_HR, patient, 11, lambda b: None)
    del no_user["header"]["user_id"]
    exercise = data_point(OMH_HR, patient, 12,
                          lambda b: b.update(temporal_relationship_to_physical_activity="active"))  # fmt: skip
    return [
        (FHIR_TOPIC, b"{not json", "malformed_json"),
        (FHIR_TOPIC, encode(glucose), "unknown_code"),
        (FHIR_TOPIC, encode(unknown_unit), "unknown_unit"),
        (FHIR_TOPIC, encode(no_subject), "missing_patient"),
        (OMH_TOPIC, encode(no_user), "missing_patient"),
        (OMH_TOPIC, encode(exercise), "wrong_context"),
        (OMH_TOPIC, b"[]", "invalid_resource"),
    ]


def test_fhir_and_open_mhealth_readings_reach_the_scores_and_bad_ones_the_dead_letters(
    kafka_bootstrap, tmp_path
):
    prefix = f"interop-{uuid.uuid4().hex[:8]}."
    env = {
        "EFFICACY_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "EFFICACY_TOPIC_PREFIX": prefix,
        "EFFICACY_APP_ID": prefix.rstrip("."),
        "EFFICACY_PARTITIONS": "2",
        "EFFICACY_WEB_ENABLED": "false",
        "EFFICACY_METRICS_PORT": "0",
        "EFFICACY_DATA_DIR": str(tmp_path / "data"),
        "EFFICACY_POPULATION_MIN_PATIENTS": str(len(PATIENTS)),
    }
    enrolments = [
        (p.encode(), Enrollment(event_id=f"enr-{p}", event_time=START, patient_id=p,
                                cohort="clinic-a").model_dump_json().encode())
        for p in PATIENTS
    ]  # fmt: skip
    fhir_records, omh_records, expected = [], [], {}
    for k, patient in enumerate(PATIENTS):
        f, o, counts = good_records(patient, k)
        fhir_records += f
        omh_records += o
        expected[patient] = counts
    bad = bad_records()
    # A Bundle whose second entry has no time: the first is a reading, the second a letter.
    partial = bundle(heart_rate(PATIENTS[1], 13, 60.0), heart_rate(PATIENTS[1], 14, 61.0))
    del partial["entry"][1]["resource"]["effectiveDateTime"]
    expected[PATIENTS[1]]["resting_heart_rate"] += 1
    bad.append((FHIR_TOPIC, encode(partial), "missing_time"))

    def settled(records) -> bool:
        letters = [r for r in records if r.topic == prefix + "deadletter"]
        return len(letters) >= len(bad) and counts_of(latest_scores(records)) == expected

    def latest_scores(records) -> dict[str, dict]:
        scores = latest_by_key(r for r in records if r.topic == prefix + "scores")
        return {key.decode(): json.loads(r.value) for key, r in scores.items()}

    with WorkerProcess(env) as worker:
        worker.wait_for_log(READY, timeout=180)
        asyncio.run(produce(kafka_bootstrap, prefix + "enrollments", enrolments))
        # keyed by anything: the patient comes from the record
        asyncio.run(
            produce(kafka_bootstrap, prefix + FHIR_TOPIC, [(None, v) for v in fhir_records])
        )
        asyncio.run(produce(kafka_bootstrap, prefix + OMH_TOPIC, [(b"x", v) for v in omh_records]))
        asyncio.run(produce(kafka_bootstrap, prefix + FHIR_TOPIC,
                            [(b"bad", v) for t, v, _ in bad if t == FHIR_TOPIC]))  # fmt: skip
        asyncio.run(produce(kafka_bootstrap, prefix + OMH_TOPIC,
                            [(b"bad", v) for t, v, _ in bad if t == OMH_TOPIC]))  # fmt: skip
        records = asyncio.run(
            read_until(kafka_bootstrap, [prefix + "scores", prefix + "deadletter"],
                       done=settled, timeout=420)
        )  # fmt: skip
        assert worker.alive(), worker.log_tail()
        raw = {
            t: asyncio.run(read_to_end(kafka_bootstrap, prefix + t))
            for t in (FHIR_TOPIC, OMH_TOPIC)
        }
        log = worker.log_path.read_text()

    assert counts_of(latest_scores(records)) == expected, worker.log_tail()
    letters = [json.loads(r.value) for r in records if r.topic == prefix + "deadletter"]
    got = sorted((letter["source_topic"].removeprefix(prefix), letter["reason"],
                  base64.b64decode(letter["value_b64"])) for letter in letters)  # fmt: skip
    assert got == sorted((topic, reason, value) for topic, value, reason in bad), worker.log_tail()
    for letter in letters:  # the origin names the raw record as sent
        topic = letter["source_topic"].removeprefix(prefix)
        [sent] = [r for r in raw[topic]
                  if (r.partition, r.offset) == (letter["partition"], letter["offset"])]  # fmt: skip
        assert sent.value == base64.b64decode(letter["value_b64"])
        assert base64.b64decode(letter["key_b64"]) == sent.key == b"bad"
    assert [x["detail"].split(":")[0] for x in letters if x["reason"] == "missing_time"] == [
        "entry[1]"
    ]
    for patient in PATIENTS:  # no patient id in the worker's log above debug level
        assert patient not in log


def counts_of(scores: dict[str, dict]) -> dict[str, Counter[str]]:
    return {
        patient: Counter(
            {m["measure"]: m["count_exposed"] + m["count_unexposed"] for m in score["measures"]}
        )
        for patient, score in scores.items()
    }
