"""streams.chunked_consumer on the real broker: one faust event per fetched
partition chunk, acknowledged through faust's own commit.

- every record is delivered exactly once, in offset order per partition, and
  the group's committed offsets reach the end of every partition;
- a chunk that is never acked holds the commit of its partition at its first
  offset (the gap of its earlier offsets does not make them committable), while
  the other partitions commit what was processed; a worker of the same group
  started after a kill resumes from the committed offsets (its first chunk of a
  partition commits although earlier offsets were committed by another member:
  faust alone would wait for them forever) and commits to the end;
- a topic written in transactions, whose commit markers take offsets no record
  has (holes between and inside chunks), is delivered and committed to its end.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from chunk_reader_app import read_chunks
from settling import poll

from cli.kafka_io import committed_offsets, create_topic, end_offsets, produce
from streams.kafka_options import aiokafka_options

pytestmark = pytest.mark.kafka
APP = Path(__file__).resolve().parent / "chunk_reader_app.py"
PARTITIONS, RECORDS = 4, 20_000


def committed_by_partition(bootstrap: str, group: str) -> dict[int, int]:
    """The group's committed offsets of the test's one topic, by partition."""
    offsets = asyncio.run(committed_offsets(bootstrap, group))
    return {tp.partition: offset for tp, offset in offsets.items()}


def test_the_faust_and_aiokafka_versions_are_the_pinned_ones():
    """ChunkedConsumer overrides faust internals: a new faust must be checked first."""
    import tomllib

    import aiokafka
    import faust

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    pins = dict(d.split("==") for d in project["project"]["dependencies"] if "==" in d)
    assert faust.__version__ == pins["faust-streaming[rocksdict]"]
    assert aiokafka.__version__ == pins["aiokafka"]


async def partition_ends(bootstrap: str, name: str) -> dict[int, int]:
    """The end offset of each partition of ``name``, by partition number."""
    return {tp.partition: offset for tp, offset in (await end_offsets(bootstrap, [name])).items()}


@pytest.fixture(scope="module")
def topic(kafka_bootstrap) -> tuple[str, dict[int, int]]:
    """A topic of RECORDS keyed records over PARTITIONS partitions; its end offsets."""
    name = f"chunked-{uuid.uuid4().hex[:8]}"

    async def create_and_fill() -> dict[int, int]:
        await create_topic(kafka_bootstrap, name, PARTITIONS)
        records = [(b"key-%d" % (i % 997), b"%d" % i) for i in range(RECORDS)]
        await produce(kafka_bootstrap, name, records)
        return await partition_ends(kafka_bootstrap, name)

    ends = asyncio.run(create_and_fill())
    assert sum(ends.values()) == RECORDS
    return name, ends


def start_reader(
    bootstrap: str, topic: str, out: Path, *hold: int, group: str | None = None
) -> tuple[str, subprocess.Popen]:
    group = group or f"chunked-reader-{uuid.uuid4().hex[:8]}"
    args = [sys.executable, str(APP), bootstrap, group, topic, str(out), *map(str, hold)]
    log = out.with_suffix(".log").open("wb")
    return group, subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)


def test_every_record_once_in_order_and_committed_to_the_end(kafka_bootstrap, topic, tmp_path):
    name, ends = topic
    out = tmp_path / "offsets.jsonl"
    group, reader = start_reader(kafka_bootstrap, name, out)
    try:
        delivered = poll(
            lambda: sum(len(c["offsets"]) for c in read_chunks(out)),
            lambda n: n >= RECORDS,
            timeout=180,
        )
        assert delivered >= RECORDS, f"{delivered} of {RECORDS} records delivered in 180 s"
        committed = poll(
            lambda: committed_by_partition(kafka_bootstrap, group),
            lambda c: c == ends,
            timeout=60,
        )
        assert committed == ends
    finally:
        reader.kill()
        reader.wait()
    chunks = read_chunks(out)
    assert sum(len(c["offsets"]) for c in chunks) == RECORDS  # nothing delivered twice
    assert len(chunks) < RECORDS / 10, "records were not delivered by chunk"
    values = set()
    for partition, end in ends.items():
        offsets = [o for c in chunks if c["partition"] == partition for o in c["offsets"]]
        assert offsets == list(range(end)), f"partition {partition} out of order or incomplete"
    for chunk in chunks:
        values.update(chunk["values"])
    assert values == {str(i) for i in range(RECORDS)}


def test_an_unacked_chunk_holds_its_partition_commit_and_a_restart_resumes(
    kafka_bootstrap, topic, tmp_path
):
    name, ends = topic
    out = tmp_path / "offsets.jsonl"
    group, reader = start_reader(kafka_bootstrap, name, out, RECORDS // 4)
    try:
        held = poll(lambda: [c for c in read_chunks(out) if c.get("held")], timeout=180)
        assert held, "no chunk was held in 180 s"
        (held,) = held
        done = [c for c in read_chunks(out) if not c.get("held")]
        processed = {}
        for chunk in done:
            processed[chunk["partition"]] = max(chunk["offsets"]) + 1
        # Every partition commits what was processed (faust commits on its timer
        # while the agent is blocked); the held chunk's partition stops at it.
        expected = {**processed, held["partition"]: held["offsets"][0]}
        expected = {p: o for p, o in expected.items() if o > 0}
        committed = poll(
            lambda: committed_by_partition(kafka_bootstrap, group),
            lambda c: c == expected,
            timeout=60,
        )
        assert committed == expected
        assert committed.get(held["partition"], 0) == held["offsets"][0]
        assert len(held["offsets"]) > 1  # the held chunk's gap covered later offsets
    finally:
        reader.kill()
        reader.wait()

    resumed = tmp_path / "resumed.jsonl"
    _, reader = start_reader(kafka_bootstrap, name, resumed, group=group)
    try:
        resumed_commit = poll(
            lambda: committed_by_partition(kafka_bootstrap, group),
            lambda c: c == ends,
            timeout=180,
        )
        assert resumed_commit == ends, "the restarted reader did not commit to the end"
    finally:
        reader.kill()
        reader.wait()
    again = read_chunks(resumed)
    for partition, end in ends.items():
        start = committed.get(partition, 0)
        offsets = [o for c in again if c["partition"] == partition for o in c["offsets"]]
        assert offsets == list(range(start, end)), f"partition {partition} after the restart"


def test_offsets_skipped_by_transaction_markers_are_committed_past(kafka_bootstrap, tmp_path):
    """Each transaction's commit marker takes an offset of every partition it
    wrote to, so records are not at consecutive offsets: the chunk gaps must
    cover the holes (or the commit stops at the first one)."""
    from aiokafka import AIOKafkaProducer

    name = f"chunked-tx-{uuid.uuid4().hex[:8]}"
    transactions, per_transaction = 200, 10

    async def create_and_fill() -> dict[int, int]:
        await create_topic(kafka_bootstrap, name, PARTITIONS)
        producer = AIOKafkaProducer(
            **aiokafka_options(kafka_bootstrap), transactional_id=f"tx-{name}"
        )
        await producer.start()
        try:
            for t in range(transactions):
                async with producer.transaction():
                    for i in range(per_transaction):
                        value = b"%d" % (t * per_transaction + i)
                        await producer.send(name, value, key=b"key-%d" % i)
        finally:
            await producer.stop()
        return await partition_ends(kafka_bootstrap, name)

    ends = asyncio.run(create_and_fill())
    records = transactions * per_transaction
    assert sum(ends.values()) > records  # the markers' offsets
    out = tmp_path / "offsets.jsonl"
    group, reader = start_reader(kafka_bootstrap, name, out)
    try:
        delivered = poll(
            lambda: sum(len(c["offsets"]) for c in read_chunks(out)),
            lambda n: n >= records,
            timeout=180,
        )
        assert delivered == records
        chunks = read_chunks(out)
        # The last record of each partition (its last offset is the last
        # transaction's marker, which no consumer is handed).
        last = {p: max(o for c in chunks if c["partition"] == p for o in c["offsets"])
                for p in ends}  # fmt: skip
        committed = poll(
            lambda: committed_by_partition(kafka_bootstrap, group),
            lambda c: c == {p: offset + 1 for p, offset in last.items()},
            timeout=60,
        )
        assert committed == {p: offset + 1 for p, offset in last.items()}
        assert all(ends[p] - 1 == committed[p] for p in ends)
    finally:
        reader.kill()
        reader.wait()
    offsets = [o for c in chunks if c["partition"] == 0 for o in c["offsets"]]
    assert len(offsets) < offsets[-1] + 1 - 100  # holes inside the stream, passed
    values = [v for c in chunks for v in c["values"]]
    assert sorted(values, key=int) == [str(i) for i in range(records)]


async def fetch_all(consumer, partitions: set, wanted: int) -> dict:
    """aiokafka's fetched_records (what faust's consumer thread calls) until
    ``wanted`` records came, by partition."""
    got: dict = {}
    for _ in range(50):
        for tp, records in (await consumer._fetcher.fetched_records(partitions, 1.0)).items():
            got.setdefault(tp, []).extend(records)
        if sum(map(len, got.values())) >= wanted:
            break
    return got


def test_records_fetched_but_not_delivered_are_fetched_again(kafka_bootstrap):
    """streams.chunked_consumer.seek_back on the real broker. aiokafka, asked for
    an *empty* set of partitions, hands over the records of every partition and
    moves past them (why ChunkedConsumer gives its thread a copy of faust's live
    set, which a recovery empties). seek_back puts a partition whose records were
    not delivered back to the first of them, so they are fetched again; it
    leaves one that a seek moved back since (recovery's seek stands) and one no
    longer assigned."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from streams.chunked_consumer import seek_back

    topic = f"seek-back-{uuid.uuid4().hex[:8]}"
    per_partition = 10

    async def scenario() -> None:
        await create_topic(kafka_bootstrap, topic, 2)
        records = [(b"k", b"%d" % i) for i in range(2 * per_partition)]
        await produce(kafka_bootstrap, topic, records, partition_of=lambda key: 0)
        await produce(kafka_bootstrap, topic, records[:per_partition], partition_of=lambda key: 1)
        consumer = AIOKafkaConsumer(
            **aiokafka_options(kafka_bootstrap),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=1 << 20,
        )
        await consumer.start()
        try:
            first, second = TopicPartition(topic, 0), TopicPartition(topic, 1)
            consumer.assign([first, second])
            fetched = await fetch_all(consumer, set(), 3 * per_partition)
            assert {tp: len(r) for tp, r in fetched.items()} == {
                first: 2 * per_partition,
                second: per_partition,
            }, "aiokafka no longer reads an empty set as every partition"
            assert await consumer.position(first) == 2 * per_partition

            consumer.seek(second, 3)  # as recovery's seek to the committed offsets
            gone = TopicPartition(topic, 7)  # not assigned
            await seek_back(
                consumer,
                {first: (5, 2 * per_partition), second: (0, per_partition), gone: (0, 1)},
            )
            assert await consumer.position(first) == 5
            assert await consumer.position(second) == 3
            again = await fetch_all(consumer, {first, second}, 2 * per_partition - 5 + 7)
            assert [r.offset for r in again[first]] == list(range(5, 2 * per_partition))
            assert [r.offset for r in again[second]] == list(range(3, per_partition))
        finally:
            await consumer.stop()

    asyncio.run(scenario())
