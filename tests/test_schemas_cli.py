"""``efficacy schemas`` and ``efficacy simulate`` (the latter against a real broker)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jsonschema
import pytest
from pydantic import TypeAdapter

from cli.kafka_io import read_until, run
from cli.main import main
from cli.programme import (
    GroundTruth,
    build_programme,
    records_digest,
    sample_messages,
    topic_schema,
)
from streams.app import measure_models
from streams.catalogue import Catalogue
from streams.patient_state import apply_event, patient_evidence
from streams.schemas import TOPIC_SCHEMAS, Origin, json_schemas
from streams.settings import Settings
from streams.validation import Rejected, validate_record

JSON_TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "null": type(None),
}


def conforms(instance, schema: dict, root: dict) -> list[str]:
    """Problems of ``instance`` against the subset of JSON Schema pydantic
    emits ($ref, oneOf/anyOf, const, enum, type, properties, required,
    additionalProperties, items). jsonschema is not a dependency; this checks
    what a producer in another language relies on."""
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/$defs/")
        return conforms(instance, root["$defs"][name], root)
    for keyword in ("oneOf", "anyOf"):
        if keyword in schema:
            matches = [s for s in schema[keyword] if not conforms(instance, s, root)]
            if keyword == "oneOf" and len(matches) != 1:
                return [f"{len(matches)} oneOf branches match"]
            return [] if matches else ["no anyOf branch matches"]
    problems = []
    if "const" in schema and instance != schema["const"]:
        problems.append(f"{instance!r} != const {schema['const']!r}")
    if "enum" in schema and instance not in schema["enum"]:
        problems.append(f"{instance!r} not in {schema['enum']}")
    kind = schema.get("type")
    wrong_type = kind is not None and not isinstance(instance, JSON_TYPES[kind])
    if wrong_type or (kind in ("number", "integer") and isinstance(instance, bool)):
        return [*problems, f"{instance!r} is not {kind}"]
    if kind == "object":
        properties = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in instance:
                problems.append(f"missing {name}")
        for name, value in instance.items():
            if name in properties:
                problems += [f"{name}: {p}" for p in conforms(value, properties[name], root)]
            elif schema.get("additionalProperties") is False:
                problems.append(f"unexpected {name}")
    if kind == "array" and "items" in schema:
        for item in instance:
            problems += conforms(item, schema["items"], root)
    return problems


def samples() -> dict[str, list[bytes]]:
    """One sample of each kind on every producer topic, from the programme module."""
    programme = build_programme(
        ["resting_heart_rate", "hba1c", "phq9"], num_patients=2, num_cohorts=1, seed=5
    )
    out: dict[str, list[bytes]] = {}
    for topic, records in programme.records.items():
        firsts = {r.label: r.value for r in records}  # one per label
        out[topic] = list(firsts.values())
    return out


def test_schemas_command_writes_a_valid_schema_per_topic(tmp_path, capsys):
    out = tmp_path / "schemas"
    assert main(["schemas", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    expected = json_schemas()
    assert set(expected) == set(TOPIC_SCHEMAS)
    written = sorted(out.glob("*.schema.json"))
    assert [p.name for p in written] == sorted(f"{t}.schema.json" for t in expected)
    for path in written:
        assert str(path) in printed
        schema = json.loads(path.read_text())
        assert schema == expected[path.name.removesuffix(".schema.json")]
        assert schema.get("type") == "object" or "oneOf" in schema or "$ref" in schema

    source_samples = samples()
    assert set(source_samples) == {"enrollments", "wearables", "labs", "pros"}
    for topic, values in source_samples.items():
        schema = json.loads((out / f"{topic}.schema.json").read_text())
        for value in values:
            instance = json.loads(value)
            assert conforms(instance, schema, schema) == [], (topic, instance)
            topic_schema(topic).validate_json(value)  # and pydantic agrees
    # the checker is not vacuous
    wearable = json.loads(source_samples["wearables"][0])
    schema = json.loads((out / "wearables.schema.json").read_text())
    assert conforms({**wearable, "value": "high"}, schema, schema)
    assert conforms({k: v for k, v in wearable.items() if k != "unit"}, schema, schema)
    assert conforms({**wearable, "colour": "red"}, schema, schema)
    enrolment = json.loads(source_samples["enrollments"][0])
    schema = json.loads((out / "enrollments.schema.json").read_text())
    assert conforms({**enrolment, "kind": "discharge"}, schema, schema)


def test_simulate_dry_run_writes_truth(tmp_path, capsys):
    truth_path = tmp_path / "truth.json"
    argv = ["simulate", "--patients", "7", "--cohorts", "2", "--obs-per-patient", "4"]
    argv += ["--measures", "phq9,hba1c", "--design", "crossover", "--truth", str(truth_path)]
    assert main([*argv, "--dry-run"]) == 0
    truth = GroundTruth.from_json(truth_path.read_text())
    assert truth.design == "crossover" and set(truth.measures) == {"phq9", "hba1c"}
    assert len(truth.patients) == 7 and truth.enrollment_events == 7 * 4
    assert main([*argv, "--dry-run", "--measures", "phq9,nope"]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.kafka
def test_simulate_publishes_exactly_the_records_of_its_truth(kafka_bootstrap, tmp_path):
    prefix = f"sim-test-{uuid.uuid4().hex[:8]}."
    truth_path = tmp_path / "truth.json"
    env = {
        **os.environ,
        "EFFICACY_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "EFFICACY_TOPIC_PREFIX": prefix,
    }
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "simulate", "--patients", "30", "--cohorts", "5",
         "--obs-per-patient", "12", "--measures", "resting_heart_rate,hba1c,phq9",
         "--bad-fraction", "0.05", "--duplicate-fraction", "0.05", "--seed", "3",
         "--truth", str(truth_path)],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "events/s" in result.stdout
    truth = GroundTruth.from_json(Path(truth_path).read_text())
    assert set(truth.sent) == {"enrollments", "wearables", "labs", "pros"}
    expected_total = sum(sent.records for sent in truth.sent.values())
    assert expected_total == (
        truth.enrollment_events
        + truth.valid_unique_readings
        + len(truth.bad_records)
        + len(truth.duplicates)
    )
    settings = Settings(topic_prefix=prefix)
    records = run(
        read_until(
            kafka_bootstrap,
            [settings.topic(topic) for topic in truth.sent],
            lambda got: len(got) >= expected_total,
            timeout=60,
        )
    )
    for topic, sent in truth.sent.items():
        mine = [(r.key, r.value) for r in records if r.topic == settings.topic(topic)]
        assert len(mine) == sent.records, topic
        assert records_digest(mine) == sent.digest, topic
    # every enrolment event was acknowledged before the first reading was sent
    enrolments = [r for r in records if r.topic == settings.topic("enrollments")]
    readings = [r for r in records if r.topic != settings.topic("enrollments")]
    assert max(r.timestamp for r in enrolments) <= min(r.timestamp for r in readings)
    assert {r.key for r in readings} <= {r.key for r in enrolments}


def test_documented_samples_are_the_generated_ones():
    """docs/topics.md's samples equal sample_messages() and validate."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "topics.md").read_text()
    section = page.split("# Topics and messages", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```json\n")[1:]]
    samples = sample_messages()
    assert [json.loads(b) for b in blocks] == [json.loads(r.value) for r in samples.values()]
    for record in samples.values():
        assert f"key `{record.key.decode()}`" in section
        topic_schema(record.topic).validate_json(record.value)


# --- the contract other languages keep: ids, descriptions, enums, examples -------------


def described_properties(node, where: str):
    """(path, property schema) of every property of every object schema in ``node``
    (not the examples, nor ``allOf``'s conditions on fields defined elsewhere)."""
    if isinstance(node, dict):
        for name, value in node.get("properties", {}).items():
            yield f"{where}.{name}", value
        for key, value in node.items():
            if key not in ("examples", "allOf"):
                yield from described_properties(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from described_properties(value, f"{where}[{i}]")


def test_every_field_of_every_exported_schema_is_described_and_the_schemas_have_ids():
    schemas = json_schemas()
    ids = set()
    for topic, schema in schemas.items():
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert topic in schema["$id"] and ":" in schema["$id"]  # a URI naming its topic
        ids.add(schema["$id"])
        fields = list(described_properties(schema, topic))
        assert fields, topic
        undescribed = [path for path, value in fields if not value.get("description", "").strip()]
        assert not undescribed, undescribed
    assert len(ids) == len(schemas)


def validator(schema: dict) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def problems(schema: dict, instance) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator(schema).iter_errors(instance)
    ]


def test_the_examples_validate_against_their_schema_and_the_worker_takes_them():
    for topic, schema in json_schemas().items():
        assert schema["examples"], topic
        for example in schema["examples"]:
            assert problems(schema, example) == [], (topic, example)
            TypeAdapter(TOPIC_SCHEMAS[topic]).validate_python(example)  # pydantic agrees


def test_measures_and_units_are_enums_of_the_catalogue():
    catalogue = Catalogue.load()
    schemas = json_schemas(catalogue)
    wearables, labs = schemas["wearables"], schemas["labs"]
    assert set(wearables["properties"]["measure"]["enum"]) == {
        s.name for s in catalogue.measures.values() if "wearable" in s.sources
    }
    assert "/min" in wearables["properties"]["unit"]["enum"]
    reading = next(e for e in labs["examples"] if e["measure"] == "hba1c")
    # every unit a lab measure accepts, in its UCUM spelling too, and only those
    for spec in catalogue.measures.values():
        if "lab" not in spec.sources:
            assert problems(labs, {**reading, "measure": spec.name})
            continue
        for unit in [spec.unit, *spec.units, *spec.ucum]:
            assert problems(labs, {**reading, "measure": spec.name, "unit": unit}) == []
    assert problems(labs, {**reading, "unit": "mm[Hg]"})  # a unit of another measure
    assert problems(labs, {**reading, "unit": "percent"})
    assert problems(labs, {**reading, "measure": "blood_ketones"})
    score = schemas["scores"]["examples"][0]
    measure_score = score["measures"][0]
    assert problems(schemas["scores"], {**score, "measures": [{**measure_score, "unit": "/min"}]})
    # a catalogue of one's own gives its own enums
    own = Catalogue(measures={"phq9": catalogue.get("phq9")})
    pros = json_schemas(own)["pros"]
    assert pros["properties"]["measure"]["enum"] == ["phq9"]
    assert sorted(pros["properties"]["unit"]["enum"]) == sorted(["score", "points", "{score}"])


def test_the_documented_samples_validate_against_the_exported_schemas():
    page = (Path(__file__).resolve().parent.parent / "docs" / "topics.md").read_text()
    section = page.split("# Topics and messages", 1)[1].split("\n## ", 1)[0]
    blocks = [json.loads(b.split("```", 1)[0]) for b in section.split("```json\n")[1:]]
    topics = [line.split("`")[1] for line in section.splitlines() if ", key `" in line]
    assert len(blocks) == len(topics) >= 6
    schemas = json_schemas()
    for topic, block in zip(topics, blocks, strict=True):
        assert problems(schemas[topic], block) == [], (topic, block)


def test_a_reading_in_a_ucum_unit_gives_the_statistics_of_the_native_unit():
    """The same readings sent with our unit names and with their UCUM spellings
    are accepted alike and give the patient the same statistics."""
    catalogue = Catalogue.load()
    settings = Settings(max_age_days=36500.0)
    models = measure_models(catalogue, settings)
    cases = [
        ("wearables", "resting_heart_rate", "bpm", "/min"),
        ("labs", "systolic_bp", "mmHg", "mm[Hg]"),
        ("labs", "hba1c", "%", "%"),
        ("labs", "fasting_glucose", "mg/dL", "mg/dL"),
        ("pros", "phq9", "score", "{score}"),
    ]
    start = datetime(2026, 1, 5, 8, tzinfo=UTC)
    rng = random.Random(3)
    checked = 0
    for topic, measure, native, ucum in cases:
        spec = catalogue.get(measure)
        source = spec.sources[0] if topic != "pros" else "pro"
        location, scale = spec.typical
        values = [location + scale * rng.uniform(-1, 1) for _ in range(20)]
        evidence = {}
        for patient, unit in ((f"native-{measure}", native), (f"ucum-{measure}", ucum)):
            records = [
                ("enrollments", {"kind": "enrollment", "patient_id": patient, "cohort": "c-1"},
                 start),
                ("enrollments", {"kind": "exposure", "patient_id": patient, "exposure": 1.0},
                 start + timedelta(days=10, hours=1)),
            ] + [
                (topic, {"patient_id": patient, "measure": measure, "value": value,
                         "unit": unit, "source": source}, start + timedelta(days=day, hours=2))
                for day, value in enumerate(values)
            ]  # fmt: skip
            state = None
            for offset, (source_topic, body, when) in enumerate(records):
                value = json.dumps({"schema_version": 1, "event_id": f"{patient}-{offset}",
                                    "event_time": when.isoformat(), **body}).encode()  # fmt: skip
                origin = Origin(topic=source_topic, partition=0, offset=offset)
                event = validate_record(
                    source_topic, patient.encode(), value, origin, catalogue, settings
                )
                state, outcome = apply_event(state, event, models)
                assert not outcome.rejected, outcome.rejected
            evidence[unit] = patient_evidence(state, measure, models[measure])
        native_evidence, ucum_evidence = evidence[native], evidence[ucum]
        assert native_evidence.count_exposed + native_evidence.count_unexposed == len(values)
        assert native_evidence.count_exposed > 0 and native_evidence.count_unexposed > 0
        for name in ("gram", "recent_gram", "reference_time", "count_exposed",
                     "count_unexposed"):  # fmt: skip
            assert getattr(ucum_evidence, name) == getattr(native_evidence, name), (measure, name)
        checked += 1
    assert checked == len(cases)
    # and a unit that is no spelling of the measure's is refused
    body = {"schema_version": 1, "event_id": "x", "event_time": start.isoformat(),
            "patient_id": "p", "measure": "systolic_bp", "value": 120.0, "unit": "/min",
            "source": "lab"}  # fmt: skip
    with pytest.raises(Rejected, match="unknown_unit"):
        validate_record("labs", b"p", json.dumps(body).encode(),
                        Origin(topic="labs", partition=0, offset=0), catalogue, settings)  # fmt: skip
