"""Whether the consumer group is behind on the raw topics (streams.group_backlog),
and its offsets read from a real broker (streams.group_offsets)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from cli.kafka_io import create_topic, produce, run
from streams.group_backlog import GroupBacklog
from streams.group_offsets import GroupOffsets
from streams.kafka_options import aiokafka_options


def test_a_live_group_that_commits_what_arrived_a_horizon_ago_is_not_behind() -> None:
    # records keep arriving and the commits trail the end by a few seconds' worth:
    # a lag in records, but nothing older than the horizon waits
    backlog = GroupBacklog(horizon=10.0)
    for second in range(0, 31, 2):
        end = 1000 * second
        backlog.observe(float(second), {"p0": end}, {"p0": max(end - 3000, 0)})
        assert not backlog.backlogged(float(second)), second
    assert backlog.lag() == 3000


def test_a_partition_holding_records_older_than_the_horizon_is_behind() -> None:
    backlog = GroupBacklog(horizon=10.0)
    backlog.observe(0.0, {"p0": 500, "p1": 800}, {"p0": 0, "p1": 0})
    # no sample a horizon old yet: unknown, not behind
    backlog.observe(6.0, {"p0": 900, "p1": 800}, {"p0": 400, "p1": 800})
    assert backlog.behind(6.0) == {}
    # at 12 s the 0 s sample is a horizon old: p0 has committed 450 of its 500
    backlog.observe(12.0, {"p0": 1300, "p1": 800}, {"p0": 450, "p1": 800})
    assert backlog.behind(12.0) == {"p0": 50}
    assert backlog.backlogged(12.0)
    assert backlog.lag() == 850
    # the group passes the 6 s sample's end by 16 s: no longer behind
    backlog.observe(16.0, {"p0": 1500, "p1": 800}, {"p0": 900, "p1": 800})
    assert not backlog.backlogged(16.0)


def test_stale_samples_mean_unknown_and_a_horizon_must_be_positive() -> None:
    backlog = GroupBacklog(horizon=5.0, stale_after=20.0)
    backlog.observe(0.0, {"p0": 100}, {"p0": 0})
    backlog.observe(5.0, {"p0": 100}, {"p0": 0})
    assert backlog.backlogged(5.0)
    assert not backlog.backlogged(25.1)  # the poll stopped answering
    with pytest.raises(ValueError, match="horizon"):
        GroupBacklog(horizon=0.0)


async def commit(bootstrap: str, group: str, offsets: dict[TopicPartition, int]) -> None:
    consumer = AIOKafkaConsumer(**aiokafka_options(bootstrap), group_id=group)
    await consumer.start()
    try:
        consumer.assign(list(offsets))
        await consumer.commit({tp: OffsetAndMetadata(o, "") for tp, o in offsets.items()})
    finally:
        await consumer.stop()


async def read_twice(offsets: GroupOffsets) -> list[tuple[dict, dict]]:
    try:
        return [await offsets.read(), await offsets.read()]  # the clients stay open
    finally:
        await offsets.close()


@pytest.mark.kafka
def test_group_offsets_reads_the_groups_commits_and_the_partitions_ends(kafka_bootstrap):
    topic, other = (f"group-offsets-{uuid.uuid4().hex[:8]}-{n}" for n in ("a", "b"))
    for name in (topic, other):
        run(create_topic(kafka_bootstrap, name, partitions=2))
    counts = {0: 7, 1: 3}
    for partition, count in counts.items():
        records = [(b"k", b"%d" % i) for i in range(count)]
        run(produce(kafka_bootstrap, topic, records, partition_of=lambda _, p=partition: p))
    group = f"group-{topic}"
    run(commit(kafka_bootstrap, group, {TopicPartition(topic, 0): 5}))

    reads = asyncio.run(read_twice(GroupOffsets(kafka_bootstrap, group, [other, topic])))
    expected_ends = {TopicPartition(t, p): 0 for t in (topic, other) for p in (0, 1)}
    expected_ends |= {TopicPartition(topic, p): n for p, n in counts.items()}
    for ends, committed in reads:
        assert ends == expected_ends
        # partition 1 never committed: the group would begin at its log start
        assert committed == {tp: 5 if tp == TopicPartition(topic, 0) else 0 for tp in ends}
    backlog = GroupBacklog(horizon=1.0)
    backlog.observe(0.0, *reads[0])
    assert backlog.lag() == 2 + 3
