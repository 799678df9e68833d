"""FHIR R4 Observations and Open mHealth data points into our readings, without
Kafka (streams.interop): the real examples of tests/data map to the measure,
canonical value, time and patient their own content says; each kind of bad
input yields its own reason. Expected values are read from the example files
(codes, values, subjects, times), the measures and unit conversions are
written out here."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta

import pytest
from interop_examples import (
    BLOOD_PRESSURE,
    FHIR,
    GLUCOSE,
    HBA1C,
    HEART_RATE,
    OMH,
    bundle,
    encode,
    fhir_resource,
    omh_body,
    omh_point,
)

from streams.catalogue import DEFAULT_CATALOGUE, Catalogue
from streams.interop import fhir, open_mhealth
from streams.interop.readings import Reading, readings
from streams.schemas import Origin, WearableReading
from streams.settings import Settings
from streams.validation import Rejected

CATALOGUE = Catalogue.load()
ORIGIN = Origin(topic="efficacy.fhir-observations", partition=0, offset=7)
NOW = datetime(2026, 6, 1, tzinfo=UTC)
# The examples date from 1999 to 2020: older than the default 10 years.
SETTINGS = Settings(max_age_days=40 * 365)


def fhir_outcomes(document: dict | bytes, catalogue: Catalogue = CATALOGUE, settings=SETTINGS):
    value = document if isinstance(document, bytes) else encode(document)
    return readings(fhir.parse, value, ORIGIN, catalogue, settings, NOW)


def omh_outcomes(document: dict | bytes, catalogue: Catalogue = CATALOGUE, settings=SETTINGS):
    value = document if isinstance(document, bytes) else encode(document)
    return readings(open_mhealth.parse, value, ORIGIN, catalogue, settings, NOW)


def accepted(outcomes) -> list[dict]:
    """The records of a list of outcomes that must all be readings."""
    assert all(isinstance(o, Reading) for o in outcomes), outcomes
    records = [json.loads(o.value) for o in outcomes]
    for outcome, record in zip(outcomes, records, strict=True):
        assert outcome.key == record["patient_id"].encode()  # keyed by patient id
        WearableReading.model_validate(record) if outcome.topic == "wearables" else None
    return records


def rejected(outcomes) -> Rejected:
    [outcome] = outcomes
    assert isinstance(outcome, Rejected), outcome
    return outcome


def day_start(day: str) -> datetime:
    return datetime.fromisoformat(day).replace(tzinfo=UTC)


# --- FHIR: the examples ----------------------------------------------------------------


def test_the_heart_rate_example_is_a_resting_heart_rate_reading():
    resource = fhir_resource(HEART_RATE)
    [record] = accepted(fhir_outcomes((FHIR / HEART_RATE).read_bytes()))
    quantity = resource["valueQuantity"]
    assert resource["code"]["coding"][0]["code"] == "8867-4"
    assert quantity["code"] == "/min"  # UCUM for beats per minute
    assert record["measure"] == "resting_heart_rate"
    assert (record["value"], record["unit"]) == (quantity["value"], "bpm")
    assert record["patient_id"] == resource["subject"]["reference"].removeprefix("Patient/")
    # a date alone: that day's start in UTC
    assert datetime.fromisoformat(record["event_time"]) == day_start(resource["effectiveDateTime"])
    assert record["source"] == "wearable"  # category vital-signs
    assert record["event_id"] == f"fhir:Observation/{resource['id']}"


def test_the_blood_pressure_panel_yields_its_systolic_component():
    resource = fhir_resource(BLOOD_PRESSURE)
    systolic, diastolic = resource["component"]
    assert systolic["code"]["coding"][0]["code"] == "8480-6"
    assert diastolic["code"]["coding"][0]["code"] == "8462-4"  # no catalogue measure
    [record] = accepted(fhir_outcomes(resource))
    assert record["measure"] == "systolic_bp"
    assert systolic["valueQuantity"]["code"] == "mm[Hg]"
    assert (record["value"], record["unit"]) == (systolic["valueQuantity"]["value"], "mmHg")
    assert record["patient_id"] == resource["subject"]["reference"].removeprefix("Patient/")
    assert datetime.fromisoformat(record["event_time"]) == day_start(resource["effectiveDateTime"])
    identifier = resource["identifier"][0]
    assert record["event_id"] == f"fhir:{identifier['system']}|{identifier['value']}#8480-6"


def test_the_hba1c_example_maps_to_hba1c_and_its_85_percent_is_implausible():
    resource = fhir_resource(HBA1C)
    [candidate] = fhir.parse((FHIR / HBA1C).read_bytes(), CATALOGUE)
    assert resource["code"]["coding"][0]["code"] == "4548-4"
    assert candidate.measure.name == "hba1c"
    assert (candidate.value, candidate.unit) == (resource["valueQuantity"]["value"], "%")
    assert candidate.source == "lab"  # category laboratory
    assert candidate.patient_id == "patient-us-core-patient-eve-everywoman"
    assert candidate.event_time == datetime.fromisoformat(resource["effectiveDateTime"])
    # 85 % is outside the catalogue's plausible HbA1c: the patients agent's rule, applied here
    letter = rejected(fhir_outcomes(resource))
    assert letter.reason == "implausible_value" and "85" in letter.detail


def test_a_glucose_of_unknown_timing_is_not_a_fasting_glucose():
    resource = fhir_resource(GLUCOSE)
    code = resource["code"]["coding"][0]["code"]
    letter = rejected(fhir_outcomes(resource))
    assert letter.reason == "unknown_code" and code in letter.detail


def test_a_bundle_yields_the_readings_of_its_observations_and_rejects_entries_apart():
    heart, pressure, glucose = (fhir_resource(n) for n in (HEART_RATE, BLOOD_PRESSURE, GLUCOSE))
    patient = {"resourceType": "Patient", "id": "example"}  # not an Observation: skipped
    outcomes = fhir_outcomes(bundle(heart, patient, pressure, glucose))
    readings_, letters = outcomes[:2], outcomes[2:]
    assert [json.loads(r.value)["measure"] for r in readings_] == [
        "resting_heart_rate",
        "systolic_bp",
    ]
    [letter] = letters
    assert letter.reason == "unknown_code" and letter.detail.startswith("entry[3]:")


def test_readings_go_to_the_source_the_category_names_if_the_measure_takes_it():
    resource = fhir_resource(BLOOD_PRESSURE)
    resource["category"][0]["coding"][0]["code"] = "laboratory"
    [outcome] = fhir_outcomes(resource)
    assert outcome.topic == "labs" and json.loads(outcome.value)["source"] == "lab"
    resource = fhir_resource(HEART_RATE)  # resting heart rate comes from wearables only
    resource["category"][0]["coding"][0]["code"] = "laboratory"
    [outcome] = fhir_outcomes(resource)
    assert outcome.topic == "wearables"


# --- FHIR: what is dead-lettered, and why ------------------------------------------------


def heart_rate(change) -> dict:
    resource = copy.deepcopy(fhir_resource(HEART_RATE))
    change(resource)
    return resource


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"", "empty"),
        (b"{not json", "malformed_json"),
        (b"[1, 2]", "invalid_resource"),
        (encode(heart_rate(lambda r: r["valueQuantity"].update(value="many"))), "invalid_resource"),
        (encode(heart_rate(lambda r: r.update(valueString=1))), "invalid_resource"),
        (encode({"resourceType": "Patient", "id": "example"}), "unsupported_resource"),
        (encode(bundle({"resourceType": "Patient", "id": "x"})), "unsupported_resource"),
        (encode(heart_rate(lambda r: r.update(status="entered-in-error"))), "unusable_status"),
        (
            encode(heart_rate(lambda r: r["code"]["coding"][0].update(code="8310-5"))),
            "unknown_code",
        ),
        (encode(heart_rate(lambda r: r.pop("subject"))), "missing_patient"),
        (
            encode(heart_rate(lambda r: r["subject"].update(reference="Group/102"))),
            "missing_patient",
        ),
        (encode(heart_rate(lambda r: r.pop("effectiveDateTime"))), "missing_time"),
        (encode(heart_rate(lambda r: r.update(effectiveDateTime="1999-07"))), "imprecise_time"),
        (encode(heart_rate(lambda r: r.pop("valueQuantity"))), "missing_value"),
        (encode(heart_rate(lambda r: r["valueQuantity"].update(code="mm[Hg]"))), "unknown_unit"),
        (encode(heart_rate(lambda r: r["valueQuantity"].update(value=440))), "implausible_value"),
        (encode(heart_rate(lambda r: r.update(effectiveDateTime="2027-01-01"))), "future_time"),
    ],
)
def test_each_kind_of_bad_fhir_input_has_its_reason(value, reason):
    letter = rejected(fhir_outcomes(value))
    assert letter.reason == reason, letter


def test_readings_older_than_max_age_are_rejected_as_the_patients_agent_would():
    letter = rejected(fhir_outcomes(fhir_resource(HEART_RATE), settings=Settings()))
    assert letter.reason == "ancient_time"


def test_a_component_without_a_value_is_rejected_and_named():
    resource = fhir_resource(BLOOD_PRESSURE)
    del resource["component"][0]["valueQuantity"]
    letter = rejected(fhir_outcomes(resource))
    assert letter.reason == "missing_value" and "component 8480-6" in letter.detail


# --- Open mHealth: the examples ------------------------------------------------------------

HEADER = json.loads((OMH / "header-1.1-with-user-id.json").read_text())


def omh_record(name: str) -> tuple[dict, dict]:
    """(the body sample, the one record its data point yields)."""
    [record] = accepted(omh_outcomes(omh_point(name)))
    assert record["patient_id"] == HEADER["user_id"]
    return omh_body(name), record


def test_open_mhealth_heart_rate():
    body, record = omh_record("heart-rate-2.0-with-temporal-relationship-to-sleep.json")
    assert record["measure"] == "resting_heart_rate"
    assert (record["value"], record["unit"]) == (body["heart_rate"]["value"], "bpm")
    expected = datetime.fromisoformat(body["effective_time_frame"]["date_time"])
    assert datetime.fromisoformat(record["event_time"]) == expected
    assert record["event_id"] == f"omh:{HEADER['id']}#heart_rate"


def test_open_mhealth_sleep_duration_in_minutes_at_the_end_of_the_night():
    body, record = omh_record("sleep-duration-2.0-valid-sleep-duration.json")
    assert body["sleep_duration"]["unit"] == "h"
    assert record["measure"] == "sleep_minutes"
    assert (record["value"], record["unit"]) == (body["sleep_duration"]["value"] * 60, "min")
    end = body["effective_time_frame"]["time_interval"]["end_date_time"]
    assert datetime.fromisoformat(record["event_time"]) == datetime.fromisoformat(end)


def test_open_mhealth_blood_pressure_yields_the_systolic():
    body, record = omh_record("blood-pressure-4.0-blood-pressure-only.json")
    assert record["measure"] == "systolic_bp"
    assert (record["value"], record["unit"]) == (body["systolic_blood_pressure"]["value"], "mmHg")


def test_open_mhealth_fasting_blood_glucose():
    body, record = omh_record("blood-glucose-2.0-with-temporal-relationship-to-meal.json")
    assert body["temporal_relationship_to_meal"] == "fasting"
    assert record["measure"] == "fasting_glucose"
    assert (record["value"], record["unit"]) == (body["blood_glucose"]["value"], "mg/dL")


def test_hourly_step_counts_are_not_daily_steps():
    letter = rejected(omh_outcomes(omh_point("step-count-3.0-valid-step-count.json")))
    assert letter.reason == "wrong_context" and "24 h" in letter.detail


def catalogue_with(tmp_path, old: str, new: str) -> Catalogue:
    text = DEFAULT_CATALOGUE.read_text()
    assert old in text
    path = tmp_path / "measures.toml"
    path.write_text(text.replace(old, new))
    return Catalogue.load(path)


@pytest.mark.parametrize(
    "name", ["step-count-3.0-valid-step-count.json", "step-count-2.0-valid-step-count.json"]
)
def test_step_counts_map_under_a_catalogue_that_takes_any_interval(tmp_path, name):
    """Step count 3.0 writes a unit-value, 2.0 a bare count (in steps)."""
    catalogue = catalogue_with(tmp_path, "#step_count?interval=24h", "#step_count")
    [outcome] = omh_outcomes(omh_point(name), catalogue)
    record = json.loads(outcome.value)
    count = omh_body(name)["step_count"]
    assert record["measure"] == "daily_steps"
    assert record["value"] == (count["value"] if isinstance(count, dict) else count)


def test_body_weight_maps_once_the_catalogue_has_a_measure_for_it(tmp_path):
    name = "body-weight-2.0-body-weight-only.json"
    assert rejected(omh_outcomes(omh_point(name))).reason == "unknown_code"  # shipped catalogue
    weight = """
[body_weight]
unit = "kg"
direction = "lower"
mcid = 2.0
plausible = [20.0, 400.0]
typical = [85.0, 15.0]
sources = ["wearable"]
units = { "lb" = { scale = 0.45359237 } }
omh = ["omh:body-weight#body_weight"]
"""
    catalogue = catalogue_with(tmp_path, "[phq9]", weight + "\n[phq9]")
    [record] = [json.loads(o.value) for o in omh_outcomes(omh_point(name), catalogue)]
    body = omh_body(name)
    assert record["measure"] == "body_weight"
    assert (record["value"], record["unit"]) == (body["body_weight"]["value"], "kg")
    point = omh_point(name)
    point["body"]["body_weight"] = {"value": 110.0, "unit": "lb"}
    [record] = [json.loads(o.value) for o in omh_outcomes(point, catalogue)]
    assert record["value"] == pytest.approx(110.0 * 0.45359237)


# --- Open mHealth: what is dead-lettered, and why --------------------------------------------


def test_a_statistic_over_a_period_is_not_a_reading():
    letter = rejected(omh_outcomes(omh_point("blood-glucose-4.0-with-everything.json")))
    assert letter.reason == "aggregate_value"


def test_a_data_point_without_a_time_frame():
    body = omh_body("blood-glucose-1.0-with-temporal-relationship-to-meal.json")
    assert "effective_time_frame" not in body
    name = "blood-glucose-1.0-with-temporal-relationship-to-meal.json"
    assert rejected(omh_outcomes(omh_point(name))).reason == "missing_time"


def test_the_invalid_header_sample_is_invalid():
    value = (OMH / "data-point-1.0-invalid-header.json").read_bytes()
    letter = rejected(omh_outcomes(value))
    assert letter.reason == "invalid_resource" and "header.id" in letter.detail


HR = "heart-rate-2.0-with-temporal-relationship-to-sleep.json"


def hr_point(change) -> bytes:
    point = omh_point(HR)
    change(point)
    return encode(point)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"\xff\xfe", "malformed_json"),
        (encode({"body": omh_body(HR)}), "invalid_resource"),
        (hr_point(lambda p: p["header"].pop("user_id")), "missing_patient"),
        (hr_point(lambda p: p["header"].update(user_id="two words")), "missing_patient"),
        (hr_point(lambda p: p["header"]["schema_id"].update(name="oxygen-saturation")), "unknown_code"),
        (hr_point(lambda p: p["body"].update(temporal_relationship_to_physical_activity="during exercise")), "wrong_context"),
        (hr_point(lambda p: p["body"].pop("effective_time_frame")), "missing_time"),
        (hr_point(lambda p: p["body"].update(effective_time_frame={"date_time": "2020-02-05T07:25:00"})), "invalid_resource"),
        (hr_point(lambda p: p["body"].pop("heart_rate")), "missing_value"),
        (hr_point(lambda p: p["body"]["heart_rate"].update(unit="beats/s")), "unknown_unit"),
    ],
)  # fmt: skip
def test_each_kind_of_bad_open_mhealth_input_has_its_reason(value, reason):
    letter = rejected(omh_outcomes(value))
    assert letter.reason == reason, letter


def test_at_rest_heart_rate_is_a_resting_heart_rate():
    point = omh_point(HR)
    point["body"]["temporal_relationship_to_physical_activity"] = "at rest"
    [record] = accepted(omh_outcomes(point))
    assert record["measure"] == "resting_heart_rate"


def test_a_time_interval_given_by_its_start_and_duration_ends_there():
    point = omh_point("sleep-duration-2.0-valid-sleep-duration.json")
    interval = point["body"]["effective_time_frame"]["time_interval"]
    start = interval["start_date_time"]
    del interval["end_date_time"]
    interval["duration"] = {"value": 10, "unit": "h"}
    [record] = accepted(omh_outcomes(point))
    expected = datetime.fromisoformat(start) + timedelta(hours=10)
    assert datetime.fromisoformat(record["event_time"]) == expected
