"""streams.consumer_seek on the real broker: a group member that fetched
records without committing and is then told to seek to its committed offsets
(as faust does after every rebalance, having cleared what it prefetched) must
get those records again when the partition has no committed offset."""

from __future__ import annotations

import time
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from cli.kafka_io import produce, run
from streams import consumer_seek
from streams.kafka_options import aiokafka_options

pytestmark = pytest.mark.kafka


async def refetched_after_seek(bootstrap: str, topic: str, group: str) -> tuple[list, list]:
    """Fetch the first records without committing, seek to committed, fetch again:
    the offsets of both fetches."""
    consumer = AIOKafkaConsumer(
        **aiokafka_options(bootstrap),
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=5,
    )
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, 0)])
        first, deadline = [], time.monotonic() + 60
        while len(first) < 5:
            assert time.monotonic() < deadline, f"fetched only {first} in 60 s"
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                first += [r.offset for r in records]
        committed = await consumer.seek_to_committed()
        assert list(committed.values()) == [None]  # nothing committed
        second = []
        for records in (await consumer.getmany(timeout_ms=2000)).values():
            second += [r.offset for r in records]
        return first, second
    finally:
        await consumer.stop()


def test_seek_to_committed_resets_a_partition_without_a_commit(kafka_bootstrap):
    topic = f"seek-{uuid.uuid4().hex[:8]}"
    run(produce(kafka_bootstrap, topic, [(b"k", b"%d" % i) for i in range(10)]))
    consumer_seek.install()
    assert consumer_seek.installed()
    first, second = run(refetched_after_seek(kafka_bootstrap, topic, f"g-{topic}"))
    assert first == [0, 1, 2, 3, 4]
    # Without the fix aiokafka keeps its position and the next fetch starts at 5.
    assert second[:1] == [0], second
