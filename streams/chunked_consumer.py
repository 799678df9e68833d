"""One faust event per fetched partition chunk, instead of one per record.

faust-streaming hands every fetched record to the conductor through
``Consumer._drain_messages``, which awaits ``wait_first`` (two tasks and an
``asyncio.wait``) per record: about a third of a bare agent's time, and a
ceiling of ~12k records/s on two cores whatever the agent does. For the topics
named in ``chunked_topics``, ``ChunkedConsumer.getmany`` wraps all records one
fetch returned for a partition into a single message whose value is a
``Chunk`` (the records' keys, values, offsets and timestamps) and whose offset
is the chunk's last offset.

Acknowledgement is faust's own: the earlier offsets of the chunk are entered as
a gap (``Consumer._add_gap``, the mechanism faust uses for offsets a compacted
topic skips), which the commit treats as acknowledged once a later offset of
the partition is. So the chunk's offsets become committable exactly when the
chunk's message is acked, i.e. after the agent has processed the whole chunk.
(Entering it here, with the read offset moved to the chunk's last but one,
does not depend on faust's drain seeing the jump from the previous read offset,
nor on its skipping a read offset of 0; ``_add_gap`` merges gaps only when they
overlap.)
Generation checks, flow control, the assignor's co-assignment and the commit
after the producer flush are unchanged: only the unit of delivery is.

A table's changelog can be delivered by chunk too (streams.stores.PartitionedByKey
names its own): faust's recovery then takes a chunk per event, which the table
expands into its records when it applies them. A standby copy of a table follows
the other worker's every write this way, one event per fetch instead of one per
record (faust's recovery loop awaits a queue and a timeout per event).

Records are never dropped past the fetch position. faust's drain reads its
*live* set of active partitions on every wake-up of aiokafka's
``fetched_records``, where an empty set means every partition: at the end of a
recovery, with all partitions paused before the seek, aiokafka handed over the
records of a paused partition, faust skipped them as inactive, and the
position stayed past them. A SIGKILL test (tests/test_reliability.py) lost
the rest of two taken-over partitions this way, one run in four. So the
consumer thread gets a copy of the set (``_getmany``), and the records of any
partition not delivered (paused meanwhile, or a rebalance) are fetched again:
``seek_back`` puts the position back to the first of them unless a seek
(recovery's to the committed offsets) moved it since.

Relies on faust-streaming 0.15.3 internals (``getmany``, ``_wait_next_records``,
``_add_gap``, ``_buffered_partitions``); the pin is in pyproject.toml.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any, NamedTuple

import faust
from aiokafka import AIOKafkaConsumer
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, Message


class Chunk(NamedTuple):
    """The records of one partition from one fetch, in offset order."""

    topic: str
    partition: int
    offsets: list[int]
    keys: list[bytes | None]
    values: list[bytes | None]
    timestamps: list[float | None]

    def __len__(self) -> int:  # faust's sensors size a message by its value
        return len(self.offsets)

    def records(self) -> list[ChunkRecord]:
        """The chunk's records, each with the event interface the agents read."""
        topic, partition = self.topic, self.partition
        return [
            ChunkRecord(key, value, topic, partition, offset, stamp)
            for key, value, offset, stamp in zip(
                self.keys, self.values, self.offsets, self.timestamps, strict=True
            )
        ]


class ChunkRecord:
    """One record of a Chunk, read like a faust event: ``key``, ``value`` and
    ``message`` (itself: ``topic``, ``partition``, ``offset``, ``timestamp``)."""

    __slots__ = ("key", "offset", "partition", "timestamp", "topic", "value")

    def __init__(
        self,
        key: bytes | None,
        value: bytes | None,
        topic: str,
        partition: int,
        offset: int,
        timestamp: float | None,
    ) -> None:
        self.key, self.value = key, value
        self.topic, self.partition, self.offset, self.timestamp = (
            topic,
            partition,
            offset,
            timestamp,
        )

    @property
    def message(self) -> ChunkRecord:
        return self

    @property
    def tp(self) -> TP:
        return TP(self.topic, self.partition)


def chunk_of(tp: TP, records: Iterable[Any]) -> Chunk:
    """A Chunk of aiokafka ConsumerRecords of partition ``tp``."""
    offsets, keys, values, stamps = [], [], [], []
    for record in records:
        offsets.append(record.offset)
        keys.append(record.key)
        values.append(record.value)
        stamps.append(None if record.timestamp is None else record.timestamp / 1000.0)
    return Chunk(tp.topic, tp.partition, offsets, keys, values, stamps)


def fetched_span(records: list[Any]) -> tuple[int, int]:
    """(first offset, offset after the last) of one partition's fetched records."""
    return records[0].offset, records[-1].offset + 1


async def seek_back(consumer: AIOKafkaConsumer, undelivered: dict[TP, tuple[int, int]]) -> None:
    """Seek each partition of ``undelivered`` (its records fetched but not
    delivered: paused meanwhile, or a rebalance) back to the first of them, so
    they are fetched again, unless its position moved back since (a seek, such
    as recovery's to the committed offsets: that one stands) or it is no longer
    assigned. Runs in the consumer's thread, without an await: nothing fetches
    between the check and the seek."""
    assigned = consumer.assignment()
    if not assigned:
        return
    assignment = consumer._subscription.subscription.assignment
    for tp, (first, after) in undelivered.items():
        if tp not in assigned:
            continue
        state = assignment.state_value(tp)
        if state.has_valid_position and state.position >= after:
            consumer.seek(tp, first)


class ChunkedConsumer(faust_aiokafka.Consumer):
    """faust's aiokafka consumer delivering one message per partition chunk for
    the app's ``chunked_topics`` (stock per-record delivery for the others)."""

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Message]]:
        records, active_partitions = await self._wait_next_records(timeout)
        generation_id = self.app.consumer_generation_id
        if records is None or self.should_stop:
            return
        if not self.flow_active:
            # faust's own behaviour: seek back to the committed offsets.
            try:
                await self.perform_seek()
            except Exception as error:
                self.log.warning("exception performing seek when flow not active %r", error)
            return
        chunked: frozenset[str] = getattr(self.app, "chunked_topics", frozenset())
        acks_enabled_for = self.app.topics.acks_enabled_for
        undelivered: dict[TP, tuple[int, int]] = {}
        fetched = [(tp, tp_records) for tp, tp_records in records.items() if tp_records]
        for index, (tp, tp_records) in enumerate(fetched):
            if not self.flow_active or self.app.consumer_generation_id != generation_id:
                # a rebalance: fetched again after its seek, or after ours
                undelivered.update((later, fetched_span(rs)) for later, rs in fetched[index:])
                break
            if not (
                active_partitions is None
                or tp in active_partitions
                or tp in self._buffered_partitions
            ):
                undelivered[tp] = fetched_span(tp_records)  # paused meanwhile
                continue
            self.app.monitor.track_tp_end_offset(tp, self.highwater(tp))
            if tp.topic in chunked:
                first, last = tp_records[0], tp_records[-1]
                # The gap runs from the offset after the last one handed over
                # (offsets a compacted topic or a transaction marker skipped)
                # to the chunk's last but one; then faust's drain, which would
                # enter an overlapping gap up to the chunk's last offset, sees
                # consecutive read offsets.
                previous = self._read_offset.get(tp)
                begin = first.offset if previous is None else min(first.offset, previous + 1)
                # (a changelog is not acknowledged, so it has no gaps: faust's drain
                # enters none for it either)
                if last.offset > begin and acks_enabled_for(tp.topic):
                    await self._add_gap(tp, begin, last.offset - 1)
                self._read_offset[tp] = last.offset - 1
                message = self._to_message(tp, last)
                message.value = chunk_of(tp, tp_records)
                yield tp, message
            else:
                for record in tp_records:
                    yield tp, self._to_message(tp, record)
        if undelivered:
            await self._thread.call_thread(seek_back, self._thread._ensure_consumer(), undelivered)

    async def _getmany(self, active_partitions: set[TP] | None, timeout: float) -> Any:
        """faust's, but the consumer thread gets a copy of the active partitions.
        faust hands it its live set, which aiokafka's ``fetched_records`` reads
        again on every wake-up; emptied meanwhile (every partition paused, as at
        the end of a recovery before the seek) it means *all* partitions to
        aiokafka, which then hands over, and moves past, records of partitions
        that are paused and will not be delivered. (faust calls this only with
        a non-empty set, and nothing runs between its check and the copy.)"""
        snapshot = None if active_partitions is None else set(active_partitions)
        return await super()._getmany(snapshot, timeout)

    async def _add_gap(self, tp: TP, offset_from: int, offset_to: int) -> None:
        """faust's gap bookkeeping, merging overlapping gaps only when the new
        one overlaps any: faust rebuilds the partition's whole interval tree
        (``merge_overlaps``, O(n log n) in the gaps since the last commit) on
        every gap, which with one gap per chunk was a sixth of the worker's
        time when readings trickle in (small chunks)."""
        committed = self._committed_offset[tp]
        if committed is not None:
            offset_from = max(offset_from, committed + 1)
        if offset_from <= offset_to:
            gaps = self._gap[tp]
            overlapping = gaps.overlaps(offset_from, offset_to + 1)
            gaps.addi(offset_from, offset_to + 1)
            if overlapping:
                gaps.merge_overlaps()


class ChunkedTransport(faust_aiokafka.Transport):
    Consumer = ChunkedConsumer


class ChunkedApp(faust.App):
    """A faust App whose consumer delivers ``chunked_topics`` by chunk."""

    def __init__(self, *args: Any, chunked_topics: Iterable[str] = (), **kwargs: Any) -> None:
        self.chunked_topics = frozenset(chunked_topics)
        super().__init__(*args, **kwargs)

    def _new_transport(self) -> ChunkedTransport:
        return ChunkedTransport(self.conf.broker_consumer, self)
