"""The end of faust's recovery on the real broker: no record fetched while the
stream partitions are seeked is lost (streams.consumer_seek,
``_on_recovery_completed``).

A worker of tests/rebalance_reader_app.py reads a topic written to at a steady
rate. A second joins; the first keeps half of the partitions, with standby
replicas of the other half's table partitions. The seek at the end of its
recovery takes seconds (as with many partitions) and its agent is slow (as a
busy one is). Stock faust resumes the stream partitions before that seek and
clears the agent's queue after it: the chunks fetched meanwhile and not yet
taken are dropped, with the fetch position past them, and never delivered.
With the fix, every offset of every partition reaches an agent. (With faust's
own code, ``rebalance_reader_app.py ... stock``, this test failed 4 of 4 runs,
45-57 of 300 offsets per partition never delivered.)
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from chunk_reader_app import read_chunks
from settling import poll

from cli.kafka_io import committed_offsets, create_topic, end_offsets, start_client
from streams.kafka_options import aiokafka_options

pytestmark = pytest.mark.kafka
APP = Path(__file__).resolve().parent / "rebalance_reader_app.py"
PARTITIONS = 4  # the app's table has as many
RATE = 40  # records per second, over all partitions
SECONDS = 30


class Reader:
    """One rebalance_reader_app process, its log and the chunks it handled."""

    def __init__(self, bootstrap: str, group: str, topic: str, out: Path) -> None:
        self.out = out
        self.log_path = out.with_suffix(".log")
        args = [sys.executable, str(APP), bootstrap, group, topic, str(out)]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ready_count(self) -> int:
        return len(re.findall(r"Worker ready", self.log()))

    def offsets(self) -> dict[int, set[int]]:
        found: dict[int, set[int]] = {}
        for chunk in read_chunks(self.out):
            found.setdefault(chunk["partition"], set()).update(chunk["offsets"])
        return found

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def publish_steadily(bootstrap: str, topic: str, total: int, rate: float) -> threading.Thread:
    """Write ``total`` records round-robin over the partitions at ``rate`` per second."""

    async def run() -> None:
        producer = AIOKafkaProducer(**aiokafka_options(bootstrap), acks="all")
        await start_client(producer, bootstrap)
        try:
            for i in range(total):
                await producer.send(topic, b"%d" % i, key=b"k%d" % i, partition=i % PARTITIONS)
                await asyncio.sleep(1.0 / rate)
            await producer.flush()
        finally:
            await producer.stop()

    thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    thread.start()
    return thread


def missing(readers: list[Reader], ends: dict[int, int]) -> dict[int, int]:
    """How many offsets of each partition no reader handled."""
    handled: dict[int, set[int]] = {p: set() for p in ends}
    for reader in readers:
        for partition, offsets in reader.offsets().items():
            handled[partition] |= offsets
    return {p: end - len(handled[p] & set(range(end))) for p, end in ends.items() if end}


def test_records_fetched_while_recovery_seeks_are_all_delivered(kafka_bootstrap, tmp_path):
    topic, group = f"rebalance-{uuid.uuid4().hex[:8]}", f"rebalance-{uuid.uuid4().hex[:8]}"
    asyncio.run(create_topic(kafka_bootstrap, topic, PARTITIONS))
    first = Reader(kafka_bootstrap, group, topic, tmp_path / "first.jsonl")
    readers = [first]
    try:
        assert poll(first.ready_count, timeout=120) >= 1, first.log()[-3000:]
        publisher = publish_steadily(kafka_bootstrap, topic, RATE * SECONDS, RATE)
        # The first worker commits on every partition before the second joins:
        # the seek at the end of its recovery then moves the fetch positions.
        committed = poll(
            lambda: asyncio.run(committed_offsets(kafka_bootstrap, group)),
            lambda offsets: len(offsets) == PARTITIONS and all(offsets.values()),
            timeout=60,
            interval=0.5,
        )
        assert len(committed) == PARTITIONS, (committed, first.log()[-3000:])
        second = Reader(kafka_bootstrap, group, topic, tmp_path / "second.jsonl")
        readers.append(second)
        # the first worker's recovery after the second joined has ended
        assert poll(first.ready_count, lambda n: n >= 2, timeout=120) >= 2, first.log()[-3000:]
        assert poll(second.ready_count, timeout=120) >= 1, second.log()[-3000:]
        publisher.join(timeout=SECONDS * 3)
        assert not publisher.is_alive()
        ends = {
            tp.partition: offset
            for tp, offset in asyncio.run(end_offsets(kafka_bootstrap, [topic])).items()
        }
        assert sum(ends.values()) == RATE * SECONDS
        lost = poll(lambda: missing(readers, ends), lambda m: not any(m.values()), timeout=90)
        assert not any(lost.values()), (
            f"offsets never delivered, by partition: {lost}",
            first.log()[-3000:],
        )
        # both took part: the rebalance moved partitions to the second worker
        assert second.offsets(), second.log()[-3000:]
    finally:
        for reader in readers:
            reader.stop()
