"""Records out, straight through the worker's Kafka producer, deliveries checked.

faust sends each record through its own buffer (a FutureMessage, a
PendingMessage and a task hand-off per record: ~100 µs, and a stall whenever
more than 100 wait, faust-streaming #173), and a failed delivery of a table's
changelog is only logged. ``Producer`` hands records to the aiokafka producer
the faust app already runs (its connection and client options: streams.app),
and returns each record's delivery future; ``delivered`` waits for all of them
and raises on the first failure, so the caller can stop before the events that
caused the records are acknowledged (and their offsets committed).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NoReturn

import faust

from streams.partitioning import key_partition

log = logging.getLogger(__name__)

EXIT_DELIVERY_FAILED = 75  # EX_TEMPFAIL: a supervisor restarts the worker


class DeliveryFailed(RuntimeError):
    """A record the worker produced was not written to Kafka."""


#: A record to send: (topic, key, value, partition); partition None: the
#: producer's partitioner on the key (Kafka's murmur2, as faust's own sends).
Outbound = tuple[str, bytes | None, bytes | None, int | None]


@dataclass(frozen=True)
class SentBatch:
    """Records queued as one batch of one partition: ``future`` resolves to
    the batch's RecordMetadata, whose offset is its first record's, once the
    broker has written all ``count`` of them (or fails for all of them)."""

    topic: str
    partition: int
    count: int
    future: asyncio.Future

    @property
    def last_offset(self) -> int:
        """The offset of the batch's last record (once written)."""
        return self.future.result().offset + self.count - 1


class Producer:
    """Sends raw (bytes) records through the faust app's aiokafka producer.

    The producer is faust-streaming 0.15.3's ``Producer._producer`` and
    aiokafka 0.14.0 (the versions pyproject pins; tests/test_chunked_consumer.py
    checks the pins)."""

    def __init__(self, app: faust.App) -> None:
        self.app = app

    async def send_many(self, records: Iterable[Outbound]) -> list[SentBatch]:
        """Queue ``records`` as one batch per partition (``send_batch``: no
        future and no pass through the accumulator per record; the producer's
        whole work is about half that of a ``send`` per record,
        benchmarks/producer_batches.py), each partition's records in their order. A partition's batch that reaches the
        producer's batch size goes out and the next one starts. Waits while an
        earlier batch of the partition has not been taken by the producer's
        sender (aiokafka's accumulator): back-pressure of about one request."""
        producer = self.app.producer._ensure_producer()
        open_batches: dict[tuple[str, int], list] = {}  # (topic, partition) -> [builder, count]
        sent: list[SentBatch] = []
        partition_counts: dict[str, int] = {}
        for topic, key, value, partition in records:
            if partition is None:
                count = partition_counts.get(topic)
                if count is None:
                    await producer.client._wait_on_metadata(topic)
                    count = len(producer.client.cluster.partitions_for_topic(topic))
                    partition_counts[topic] = count
                # the producer's partitioner on a key (key_partition: the same
                # murmur2, remembered for the patients the step just routed)
                partition = (
                    key_partition(key, count)
                    if key is not None
                    else producer._partition(topic, None, key, value, key, value)
                )
            entry = open_batches.get((topic, partition))
            if entry is None:
                entry = open_batches[(topic, partition)] = [producer.create_batch(), 0]
            if entry[0].append(timestamp=None, key=key, value=value) is None:  # full
                sent.append(await self._submit(producer, topic, partition, *entry))
                entry[0], entry[1] = producer.create_batch(), 0
                entry[0].append(timestamp=None, key=key, value=value)  # a first record fits
            entry[1] += 1
        for (topic, partition), (builder, count) in open_batches.items():
            sent.append(await self._submit(producer, topic, partition, builder, count))
        return sent

    @staticmethod
    async def _submit(producer, topic: str, partition: int, builder, count: int) -> SentBatch:
        future = await producer.send_batch(builder, topic, partition=partition)
        return SentBatch(topic, partition, count, future)

    async def send(
        self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None
    ) -> asyncio.Future:
        """Queue one record; returns its delivery future (RecordMetadata). The
        partition defaults to the producer's partitioner on the key (Kafka's
        murmur2, as faust's own sends)."""
        producer = self.app.producer._ensure_producer()
        return await producer.send(topic, value=value, key=key, partition=partition)


async def delivered(futures: Iterable[asyncio.Future]) -> None:
    """Wait until every record is written; DeliveryFailed on the first failure."""
    futures = list(futures)
    if not futures:
        return
    results = await asyncio.gather(*futures, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise DeliveryFailed(
            f"{len(errors)} of {len(futures)} records not delivered: {errors[0]!r}"
        ) from errors[0]


def stop_now(error: DeliveryFailed) -> NoReturn:
    """Exit at once, without the clean shutdown's offset commit: records the
    worker produced were lost, and the events that caused them must be read
    again by the next worker. (A delivery that waits on an unreachable broker
    does not fail: the worker waits with it, and commits nothing past it.)"""
    log.critical("stopping the worker: %s", error)
    logging.shutdown()  # flush the log before the hard exit
    os._exit(EXIT_DELIVERY_FAILED)
