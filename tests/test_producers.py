"""Producers in other languages, on the real broker (docs/ingest.md).

A Java producer (examples/producers/Producer.java, Kafka's own client: murmur2
partitioner) publishes the enrolments and half the readings; the other half
arrives on the wrong partition, as from a librdkafka client with its default
partitioner. Two workers share the partitions, so a misplaced record is mostly
read by a worker that does not own its patient: each re-routes every misplaced
record it reads to its key's partition (once: the copy is where it belongs),
counts it (``efficacy_events_rerouted_total``), and the run settles with every
patient's statistics equal to the batch computation: nothing lost, nothing
counted twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import urllib.request
from pathlib import Path

import pytest
from monitoring_files import free_port
from prometheus_client.parser import text_string_to_metric_families
from settling import poll
from test_reliability import (
    MEASURE,
    PARTITIONS,
    Run,
    assert_statistics_equal_batch,
    wait_settled,
)

from cli.broker import resolve_jars
from cli.kafka_io import produce, read_to_end
from cli.programme import build_programme
from cli.worker_process import READY, WorkerProcess
from streams.partitioning import key_partition

pytestmark = pytest.mark.kafka
PRODUCER = Path(__file__).resolve().parent.parent / "examples" / "producers" / "Producer.java"


def test_a_java_producer_and_a_misplacing_producer_both_reach_the_scores(kafka_bootstrap, tmp_path):
    programme = build_programme(
        [MEASURE], num_patients=16, num_cohorts=2, obs_per_patient=10, seed=53,
        bad_fraction=0.0, duplicate_fraction=0.0,
    )  # fmt: skip
    run = Run(kafka_bootstrap, "producers", programme)
    records = programme.send_order()
    readings = [r for r in records if r.topic != "enrollments"]
    by_java = [r for r in records if r.topic == "enrollments"] + readings[::2]
    misplaced = readings[1::2]
    ports = [free_port(), free_port()]
    with contextlib.ExitStack() as stack:
        workers = [
            stack.enter_context(
                WorkerProcess(run.env(tmp_path / f"w{i}", EFFICACY_METRICS_PORT=str(port)))
            )
            for i, port in enumerate(ports)
        ]
        for worker in workers:
            worker.wait_for_log(READY)
        # The group has settled on both workers before anything is misplaced.
        wearables = run.settings.topic("wearables")
        owned = poll(
            lambda: [w.assigned(wearables) for w in workers], lambda a: all(a), timeout=180
        )
        assert all(owned), owned
        lines = "".join(
            f"{run.settings.topic(r.topic)}\t{r.key.decode()}\t{r.value.decode()}\n"
            for r in by_java
        )
        java = subprocess.run(
            ["java", "-cp", f"{resolve_jars()}/*", str(PRODUCER), kafka_bootstrap],
            input=lines, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert java.returncode == 0, java.stderr[-2000:]
        assert f"sent {len(by_java)}" in java.stdout

        def elsewhere(key: bytes | None) -> int:
            return (key_partition(key, PARTITIONS) + 1) % PARTITIONS

        for topic in {r.topic for r in misplaced}:
            mine = [(r.key, r.value) for r in misplaced if r.topic == topic]
            asyncio.run(produce(kafka_bootstrap, run.settings.topic(topic), mine, elsewhere))
        wait_settled(run, timeout=420)
        for worker in workers:
            assert worker.alive(), worker.log_tail()
        assert_statistics_equal_batch(run)
        assert sum(rerouted(port) for port in ports) == len(misplaced)
    # Each misplaced record was sent on once, to its key's partition.
    for topic in {r.topic for r in misplaced}:
        read = asyncio.run(read_to_end(kafka_bootstrap, run.settings.topic(topic)))
        sent = {r.value for r in misplaced if r.topic == topic}
        copies = [r for r in read if r.value in sent]
        assert len(copies) == 2 * len(sent), topic
        placed = [r for r in copies if r.partition == key_partition(r.key, PARTITIONS)]
        assert {r.value for r in placed} == sent, topic


def rerouted(port: int) -> float:
    """efficacy_events_rerouted_total of the worker serving /metrics on ``port``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "efficacy_events_rerouted_total"
    )
