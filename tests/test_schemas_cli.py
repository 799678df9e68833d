"""``efficacy schemas`` and ``efficacy simulate`` (the latter against a real broker)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from streams.cli import main
from streams.kafka_io import read_until, run
from streams.programme import (
    GroundTruth,
    build_programme,
    records_digest,
    sample_messages,
    topic_schema,
)
from streams.schemas import TOPIC_SCHEMAS, json_schemas
from streams.settings import Settings

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
        [sys.executable, "-m", "streams.cli", "simulate", "--patients", "30", "--cohorts", "5",
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
