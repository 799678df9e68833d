"""streams.schemas.json_bytes writes the bytes ``model_dump_json().encode()``
would, for every message model the worker sends and for its table values."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from pydantic import BaseModel, TypeAdapter

from model.config import ModelConfig
from streams.catalogue import Catalogue
from streams.patient_state import apply_event
from streams.schemas import (
    EXAMPLES_FILE,
    TOPIC_SCHEMAS,
    EnrollmentRecord,
    Observation,
    Origin,
    PatientEvidence,
    json_bytes,
)


def test_every_topics_example_is_written_byte_for_byte_as_model_dump_json() -> None:
    examples = json.loads(EXAMPLES_FILE.read_text())
    checked = 0
    for topic, model in TOPIC_SCHEMAS.items():
        adapter = TypeAdapter(model)
        for example in examples[topic]:
            value = adapter.validate_python(example)
            if isinstance(value, BaseModel):
                assert json_bytes(value) == value.model_dump_json().encode(), topic
                checked += 1
    assert checked >= len(TOPIC_SCHEMAS) - 1  # every topic but a union's


def test_a_patient_record_with_infinite_fields_is_written_as_model_dump_json() -> None:
    """A record's statistics carry -inf ("nothing sealed"), written as the
    JSON extension its config allows; a record holding a pending reading too."""
    catalogue = Catalogue.load()
    measure = "resting_heart_rate"
    models = {measure: ModelConfig()} | {
        name: ModelConfig() for name in catalogue.measures if name != measure
    }
    origin = Origin(topic="wearables", partition=0, offset=1, timestamp=None)
    time = datetime(2026, 1, 5, tzinfo=UTC)
    reading = Observation(event_id="r1", event_time=time, patient_id="p-1", measure=measure,
                          value=61.0, unit="bpm", source="wearable", origin=origin)  # fmt: skip
    held, _ = apply_event(None, reading, models)  # not enrolled: the reading is held
    enrolment = EnrollmentRecord.model_validate(
        {
            "event": {"kind": "enrollment", "event_id": "e1", "event_time": "2026-01-01T00:00:00Z",
                      "patient_id": "p-1", "cohort": "c", "arm": "a", "exposed": False},
            "origin": origin.model_dump(),
        }
    )  # fmt: skip
    record, _ = apply_event(held, enrolment, models)
    for value in (held, record):
        assert json_bytes(value) == value.model_dump_json().encode()
    assert b"-Infinity" in json_bytes(record)
    evidence = PatientEvidence(measure=measure, patient_id="p-1", cohort="c", gram=[1.0],
                               reference_time=float("-inf"), count_exposed=0, count_unexposed=1)  # fmt: skip
    assert json_bytes(evidence) == evidence.model_dump_json().encode()


def test_evidence_batches_are_written_as_the_validated_models_would_be(tmp_path) -> None:
    """evidence_batch_json of evidence_fields against EvidenceBatch of
    PatientEvidence models validated from the same fields: the same bytes,
    for patients with covariates, a cohort that needs escaping, and window
    statistics present and absent."""
    from cli.programme import SIMULATED_COVARIATES, build_programme
    from streams.app import measure_models
    from streams.catalogue import DEFAULT_CATALOGUE
    from streams.patient_state import evidence_fields
    from streams.schemas import EvidenceBatch, evidence_batch_json
    from streams.settings import Settings
    from streams.validation import Rejected, validate_record

    path = tmp_path / "measures.toml"
    path.write_text(DEFAULT_CATALOGUE.read_text() + SIMULATED_COVARIATES)
    catalogue = Catalogue.load(path)
    settings = Settings(max_age_days=36500.0)
    models = measure_models(catalogue, settings)
    measure = "resting_heart_rate"
    programme = build_programme(
        [measure], catalogue=catalogue, num_patients=30, num_cohorts=3, obs_per_patient=6,
        seed=4, spec_overrides={measure: {"with_covariates": True}},
    )  # fmt: skip
    records = {}
    for offset, raw in enumerate(programme.send_order()):
        origin = Origin(topic=raw.topic, partition=0, offset=offset)
        try:
            event = validate_record(raw.topic, raw.key, raw.value, origin, catalogue, settings)
        except Rejected:
            continue
        records[event.patient_id], _ = apply_event(records.get(event.patient_id), event, models)
    chosen = list(records.values())
    chosen[0].cohort = 'clinic "7", north'  # quotes and a comma
    chosen[1].measures[measure].window_gram = None  # no window kept: computed from parts
    items = evidence_fields(chosen, measure, models[measure])
    assert len(items) == len(chosen) and any(i["covariates"] for i in items)
    expected = EvidenceBatch(
        measure=measure, items=[PatientEvidence.model_validate(i) for i in items]
    ).model_dump_json()
    assert evidence_batch_json(measure, items) == expected.encode()
