"""Small asyncio Kafka helpers for producers and readers outside the worker
(the demo, the simulator, tests). Each takes the broker as Settings (TLS and
SASL included) or a plaintext bootstrap address (streams.kafka_options); a broker
that refuses the credentials raises KafkaAccessError saying which setting to check."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from streams.group_offsets import GroupOffsets, all_partitions
from streams.kafka_options import aiokafka_options, start_client
from streams.settings import Settings

Broker = Settings | str


async def produce(
    bootstrap_servers: Broker,
    topic: str,
    records: Iterable[tuple[bytes | None, bytes]],
    partition_of: Callable[[bytes | None], int] | None = None,
) -> int:
    """Send (key, value) records to ``topic`` and wait for every ack. Returns the
    count. ``partition_of(key)``: the partition of each record (default: the
    producer's murmur2 partitioner), e.g. to act as a producer with another one."""
    producer = AIOKafkaProducer(**aiokafka_options(bootstrap_servers), acks="all")
    await start_client(producer, bootstrap_servers)
    try:
        futures = [
            await producer.send(
                topic, value=value, key=key, partition=partition_of(key) if partition_of else None
            )
            for key, value in records
        ]
        await producer.flush()
        for future in futures:
            await future
        return len(futures)
    finally:
        await producer.stop()


async def read_until(
    bootstrap_servers: Broker,
    topics: list[str],
    done: Callable[[list[ConsumerRecord]], bool],
    timeout: float,
) -> list[ConsumerRecord]:
    """Read ``topics`` from the beginning until ``done(records)`` or ``timeout`` seconds."""
    consumer = AIOKafkaConsumer(
        *topics,
        **aiokafka_options(bootstrap_servers),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        metadata_max_age_ms=1000,
    )
    await start_client(consumer, bootstrap_servers)
    records: list[ConsumerRecord] = []
    deadline = time.monotonic() + timeout
    try:
        while not done(records) and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for partition_records in batch.values():
                records.extend(partition_records)
    finally:
        await consumer.stop()
    return records


def run(coroutine):
    """asyncio.run for synchronous callers."""
    return asyncio.run(coroutine)


async def read_to_end(
    bootstrap_servers: Broker, topic: str, timeout: float = 60.0
) -> list[ConsumerRecord]:
    """Every record of ``topic`` up to its end offsets as of the call."""
    from aiokafka import TopicPartition

    consumer = AIOKafkaConsumer(
        **aiokafka_options(bootstrap_servers),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        metadata_max_age_ms=1000,
    )
    await start_client(consumer, bootstrap_servers)
    records: list[ConsumerRecord] = []
    try:
        deadline = time.monotonic() + timeout
        partitions = None
        while not partitions and time.monotonic() < deadline:
            partitions = consumer.partitions_for_topic(topic)
            if not partitions:
                await consumer.topics()
                await asyncio.sleep(0.2)
        if not partitions:
            raise TimeoutError(f"topic {topic} not found within {timeout} s")
        assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(assigned)
        await consumer.seek_to_beginning(*assigned)
        end = await consumer.end_offsets(assigned)
        while [tp for tp in assigned if await consumer.position(tp) < end[tp]]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic} to its end took longer than {timeout} s")
            batch = await consumer.getmany(timeout_ms=500)
            for partition_records in batch.values():
                records.extend(partition_records)
    finally:
        await consumer.stop()
    return records


async def committed_offsets(bootstrap_servers: Broker, group: str) -> dict:
    """The offset consumer group ``group`` has committed for each topic partition
    (a partition it never committed is absent)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**aiokafka_options(bootstrap_servers))
    await start_client(admin, bootstrap_servers)
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {tp: meta.offset for tp, meta in offsets.items()}


async def create_topic(bootstrap_servers: Broker, name: str, partitions: int) -> None:
    """Create topic ``name`` with ``partitions`` partitions (replication 1)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(**aiokafka_options(bootstrap_servers))
    await start_client(admin, bootstrap_servers)
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()


async def group_lag(bootstrap_servers: Broker, group: str, topics: list[str]) -> int:
    """Records of ``topics`` not yet committed by consumer group ``group`` (0: the
    group has committed every partition up to its end offset)."""
    offsets = GroupOffsets(bootstrap_servers, group, topics)
    try:
        ends, committed = await offsets.read()
    finally:
        await offsets.close()
    return sum(max(end - committed[tp], 0) for tp, end in ends.items())


async def end_offsets(bootstrap_servers: Broker, topics: list[str]) -> dict:
    """The end offset of every partition of ``topics`` now."""
    consumer = AIOKafkaConsumer(**aiokafka_options(bootstrap_servers), metadata_max_age_ms=500)
    await start_client(consumer, bootstrap_servers)
    try:
        return await consumer.end_offsets(await all_partitions(consumer, topics))
    finally:
        await consumer.stop()
