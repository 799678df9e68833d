"""The project's worker as a real subprocess against the real broker: an enrolment
and a reading in, the patient's statistics out (population-evidence); a malformed
record lands on the dead-letter topic with its original bytes."""

from __future__ import annotations

import base64
import json
import uuid

import pytest

from cli.kafka_io import produce, read_until, run
from cli.worker_process import READY, WorkerProcess
from streams.kafka_options import aiokafka_options

pytestmark = pytest.mark.kafka
CREATED_BY_WORKER = ("wearables", "scores", "alerts", "deadletter", "structure-selection")


async def topic_partitions(bootstrap: str, topics: list[str]) -> dict[str, int]:
    """Partition count of each topic, as the broker describes it (0: no such topic)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**aiokafka_options(bootstrap))
    await admin.start()
    try:
        described = await admin.describe_topics(topics)
        return {d["topic"]: len(d["partitions"]) for d in described}
    finally:
        await admin.close()


@pytest.mark.parametrize("store", ["memory://", "rocksdb://"])
def test_worker_round_trips_a_reading_and_dead_letters_a_bad_one(kafka_bootstrap, tmp_path, store):
    """With either store (rocksdb:// is production's; faust's stock RocksDB store
    lost the patients agent's saves, streams/stores.py)."""
    prefix = f"smoke-{uuid.uuid4().hex[:8]}."
    env = {
        "EFFICACY_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "EFFICACY_TOPIC_PREFIX": prefix,
        "EFFICACY_APP_ID": f"smoke-{uuid.uuid4().hex[:8]}",
        "EFFICACY_PARTITIONS": "2",
        "EFFICACY_WEB_ENABLED": "false",
        "EFFICACY_DATA_DIR": str(tmp_path / "not" / "yet" / "there"),  # created by the worker
        "EFFICACY_STORE_URL": store,
        "EFFICACY_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"),
    }
    if store == "memory://":  # a cache location that cannot be created: logged, not fatal
        (tmp_path / "a-file").write_text("")
        env["EFFICACY_COMPILATION_CACHE_DIR"] = str(tmp_path / "a-file" / "jax")
    enrolment = {
        "kind": "enrollment",
        "event_id": "e-0",
        "event_time": "2026-11-19T08:00:00Z",
        "patient_id": "p-1",
        "cohort": "clinic-a",
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
        worker.wait_for_log(READY)  # its topics exist: none is auto-created by our producer
        run(
            produce(
                kafka_bootstrap, prefix + "enrollments", [(b"p-1", json.dumps(enrolment).encode())]
            )
        )
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
                [prefix + "population-evidence", prefix + "deadletter"],
                done=lambda rs: len(rs) >= 2,
                timeout=90,
            )
        )
        assert worker.alive(), worker.log_tail()
        # Source topics and those the worker only writes are created by it with the pipeline's
        # partitions, not auto-created by the broker with one.
        partitions = run(topic_partitions(kafka_bootstrap, [prefix + t for t in CREATED_BY_WORKER]))
        assert partitions == {prefix + t: 2 for t in CREATED_BY_WORKER}, partitions
        exit_code = worker.stop()
    by_topic = {r.topic.removeprefix(prefix): r for r in records}
    assert set(by_topic) == {"population-evidence", "deadletter"}, worker.log_tail()

    # The enrolment may be applied in the reading's batch or in one before it (an
    # evidence message without readings is not sent): the last message has both.
    evidence = [r for r in records if r.topic == prefix + "population-evidence"]
    batch = json.loads(evidence[-1].value)
    assert evidence[-1].key == b"resting_heart_rate"
    assert batch["measure"] == "resting_heart_rate"
    [item] = batch["items"]
    assert (item["patient_id"], item["cohort"]) == ("p-1", "clinic-a")
    assert (item["count_unexposed"], item["count_exposed"]) == (1, 0)

    letter = json.loads(by_topic["deadletter"].value)
    assert letter["reason"] == "malformed_json"
    assert letter["source_topic"] == prefix + "wearables"
    assert letter["offset"] >= 0 and letter["partition"] >= 0
    assert base64.b64decode(letter["value_b64"]) == b"{not json"
    assert exit_code == 0, worker.log_tail()
    if store == "memory://":
        assert "compilation cache off" in worker.log_path.read_text(), worker.log_tail()
