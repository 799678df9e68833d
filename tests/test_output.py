"""streams.output: a batch's records count as written only when every delivery
succeeded (pure asyncio futures), and ``Producer.send_many`` writes records in
batches per partition to a real broker: every record once, in its partition's
order, keyed records on their key's partition, each batch's offsets its own."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from types import SimpleNamespace

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from streams.output import DeliveryFailed, Producer, delivered
from streams.partitioning import key_partition


def test_every_delivery_must_succeed():
    async def scenario(fail: bool) -> None:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in range(3)]
        futures[0].set_result("metadata")
        if fail:
            futures[1].set_exception(TimeoutError("request timed out"))
        else:
            futures[1].set_result("metadata")
        loop.call_later(0.01, futures[2].set_result, "metadata")  # completes later
        await delivered(futures)

    asyncio.run(scenario(fail=False))
    with pytest.raises(DeliveryFailed, match=r"1 of 3 records not delivered.*timed out"):
        asyncio.run(scenario(fail=True))
    asyncio.run(delivered([]))


PARTITIONS = 3


async def _send_and_read_back(bootstrap: str, records: list) -> tuple[list, dict]:
    """Send ``records`` with send_many through a real aiokafka producer of 16 KB
    batches (several batches per partition here); returns the batches and
    what each partition holds, (offset, key, value) in offset order."""
    topic = records[0][0]
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
    finally:
        await admin.close()
    aio = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_batch_size=16384)
    await aio.start()
    try:
        app = SimpleNamespace(producer=SimpleNamespace(_ensure_producer=lambda: aio))
        batches = await Producer(app).send_many(records)  # type: ignore[arg-type]
        await delivered([batch.future for batch in batches])
    finally:
        await aio.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        held: dict[int, list] = {p: [] for p in range(PARTITIONS)}
        deadline = asyncio.get_running_loop().time() + 30
        while sum(map(len, held.values())) < len(records):
            if asyncio.get_running_loop().time() > deadline:
                break  # records missing: the comparison below says which
            fetched = await consumer.getmany(timeout_ms=1000)
            for tp, messages in fetched.items():
                held[tp.partition].extend((m.offset, m.key, m.value) for m in messages)
    finally:
        await consumer.stop()
    return batches, held


def test_send_many_writes_each_partitions_records_in_order_in_batches(kafka_bootstrap):
    topic = f"send-many-{uuid.uuid4().hex[:8]}"
    records = []
    for i in range(120):  # ~2 kB each: ~240 kB, several 16 KB batches per partition
        key = f"patient-{i % 17}".encode()
        partition = None if i % 4 else i % PARTITIONS  # most by key, some given
        records.append((topic, key, f"{i:04d}".encode() * 500, partition))
    batches, held = asyncio.run(_send_and_read_back(kafka_bootstrap, records))

    expected: dict[int, list] = {p: [] for p in range(PARTITIONS)}
    for _, key, value, partition in records:
        where = key_partition(key, PARTITIONS) if partition is None else partition
        expected[where].append((key, value))
    for partition in range(PARTITIONS):  # every record once, in its partition's order
        assert [(k, v) for _, k, v in held[partition]] == expected[partition]
    assert sum(batch.count for batch in batches) == len(records)
    assert len(batches) > 2 * PARTITIONS  # the batches filled and went out in turn
    for batch in batches:  # a batch's offsets hold its own records
        first = batch.future.result().offset
        offsets = {offset for offset, _, _ in held[batch.partition]}
        assert set(range(first, batch.last_offset + 1)) <= offsets
    by_partition: dict[int, list] = {}
    for batch in batches:
        by_partition.setdefault(batch.partition, []).append(batch)
    for partition, ordered in by_partition.items():
        spans = [(b.future.result().offset, b.last_offset) for b in ordered]
        assert spans[0][0] == 0 and spans[-1][1] == len(held[partition]) - 1
        assert all(end + 1 == start for (_, end), (start, _) in itertools.pairwise(spans))
