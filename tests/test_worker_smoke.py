"""The project's worker as a real subprocess against the real broker: a record in,
the worker's output record out; a malformed record lands on the dead-letter topic."""

from __future__ import annotations

import base64
import json
import uuid

import pytest

from streams.kafka_io import produce, read_until, run
from streams.worker_process import WorkerProcess

pytestmark = pytest.mark.kafka


def test_worker_round_trips_a_reading_and_dead_letters_a_bad_one(kafka_bootstrap, tmp_path):
    prefix = f"smoke-{uuid.uuid4().hex[:8]}."
    env = {
        "EFFICACY_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "EFFICACY_TOPIC_PREFIX": prefix,
        "EFFICACY_APP_ID": f"smoke-{uuid.uuid4().hex[:8]}",
        "EFFICACY_PARTITIONS": "2",
        "EFFICACY_WEB_ENABLED": "false",
        "EFFICACY_DATA_DIR": str(tmp_path / "not" / "yet" / "there"),  # created by the worker
    }
    reading = {
        "event_id": "e-1",
        "event_time": "2026-11-20T08:00:00Z",
        "patient_id": "p-1",
        "measure": "resting_heart_rate",
        "value": 64.0,
        "unit": "bpm",
    }
    with WorkerProcess(env) as worker:
        run(
            produce(
                kafka_bootstrap,
                prefix + "wearables",
                [(b"p-1", json.dumps(reading).encode()), (b"p-2", b"{not json")],
            )
        )
        records = run(
            read_until(
                kafka_bootstrap,
                [prefix + "observations", prefix + "deadletter"],
                done=lambda rs: len(rs) >= 2,
                timeout=90,
            )
        )
        assert worker.alive(), worker.log_tail()
        exit_code = worker.stop()
    by_topic = {r.topic.removeprefix(prefix): r for r in records}
    assert set(by_topic) == {"observations", "deadletter"}, worker.log_tail()

    observation = json.loads(by_topic["observations"].value)
    assert by_topic["observations"].key == b"p-1"
    assert observation["event_id"] == "e-1"
    assert observation["value"] == 64.0
    assert observation["source"] == "wearable"

    letter = json.loads(by_topic["deadletter"].value)
    assert letter["reason"] == "malformed_json"
    assert letter["source_topic"] == prefix + "wearables"
    assert letter["offset"] >= 0 and letter["partition"] >= 0
    assert base64.b64decode(letter["value_b64"]) == b"{not json"
    assert exit_code == 0, worker.log_tail()
