"""Tables whose changelog partition, and RocksDB partition database, follow the
key and not the event being processed.

Faust assumes a table is written only while an agent processes an event of the
key's own partition: the changelog partition defaults to the current event's,
and the RocksDB store puts and gets a key in the database of the current event's
partition (``faust.stores.rocksdb.Store._set`` asserts there is an event). Our
agents break that assumption on purpose: a ``take_events`` batch mixes
partitions (and, for the patients agent, topics), and the rescoring after a new
population posterior writes from a task, outside of any stream. With the stock
store a record would be saved in another partition's database, read back as
missing by a batch whose last event came from another partition, or not saved
at all (AssertionError outside a stream).

``PartitionedByKey`` tables compute the partition of every key themselves
(``partition_for_key``) and use it for both the changelog and the store.

``write_many`` is their write path: every key set in the store at once and its
changelog record handed straight to the producer, then the records the writes
caused (scores, evidence, alerts), returning the delivery futures for the
caller to await before the events that caused the writes are acknowledged.
``values_of`` is their read path. Both serialise each key once, as faust does
(``key_bytes``), and go to the store directly, a step's writes in one RocksDB
write batch per partition (through faust, a key passed its serialiser registry
three times and every read its sensors; benchmarks/README.md section 6
measured no difference in throughput either way).
One writer sends at a time, in the order the writers set their values: the
agent's batches and the rescoring task write the same patients, and a score
sent out of that order would leave a patient's latest score older than its
state. faust's own path (``table[key] = value``) costs ~150 µs a key in
its per-message buffer and only logs a failed changelog delivery.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import itertools
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple, Self

import faust
from faust.stores import rocksdb
from faust.types import TP
from yarl import URL

from streams.chunked_consumer import Chunk, ChunkRecord
from streams.output import Outbound, Producer, SentBatch

#: Keys that every JSON encoder writes as themselves in quotes.
PLAIN_KEYS = ("patient-1", "resting_heart_rate/p-2", "x y:z.~")


class ChangelogRecord(NamedTuple):
    """One record of a changelog chunk, read as faust's stores read an event:
    the decoded ``key`` and ``value`` (None where the store reads only the raw
    ones), and ``message``: the raw key and value, partition, tp and offset."""

    key: Any
    value: Any
    message: ChunkRecord


def _quoted(key: str) -> bytes:
    return b'"%s"' % key.encode()


def _unchanged(value: bytes) -> bytes:
    return value


class PartitionedByKey(faust.Table):
    """A table that knows the partition of each of its keys: subclasses define
    ``partition_for_key(key) -> int``, used for the changelog and the store."""

    @classmethod
    def register(cls, app: faust.App, name: str, partitions: int) -> Self:
        """A table of ``cls`` on ``app``: string keys, bytes values (the agents
        serialise their pydantic records themselves), no default."""
        table = cls(
            app, name=name, default=None, key_type=str, value_type=bytes, partitions=partitions,
            # in events of the changelog, which come by chunk (``changelog_records``,
            # each at most a fetch of the partition, consumer_max_fetch_size); a
            # standby copy applies every other chunk, its takeover reads the rest again
            recovery_buffer_size=8, standby_buffer_size=2,
        )  # fmt: skip
        return app.tables.add(table)

    def apply_changelog_batch(self, batch: Iterable[Any]) -> None:
        """faust's, with each Chunk event expanded into its records
        (``changelog_records``)."""
        super().apply_changelog_batch(self.changelog_records(batch))

    def changelog_records(self, batch: Iterable[Any]) -> Iterator[Any]:
        """The changelog records of ``batch`` as faust's stores read events: a
        Chunk event (the changelog delivered by chunk, streams.chunked_consumer)
        as one ``ChangelogRecord`` per record, any other event as itself. The
        RocksDB store reads the raw key and value of ``message``; the memory
        store the decoded ``key`` and ``value``, decoded here as faust decodes a
        changelog event."""
        raw = isinstance(self.data, KeyPartitionedRocksDB)
        serializers = self.app.serializers
        for event in batch:
            chunk = event.value
            if not isinstance(chunk, Chunk):
                yield event
                continue
            for record in chunk.records():
                if raw:
                    yield ChangelogRecord(None, None, record)
                    continue
                key = serializers.loads_key(
                    self.key_type, record.key, serializer=self.key_serializer
                )
                value = serializers.loads_value(
                    self.value_type, record.value, serializer=self.value_serializer
                )
                yield ChangelogRecord(key, value, record)

    async def write_many(
        self,
        items: Mapping[str, bytes],
        producer: Producer,
        caused: Iterable[Outbound] = (),
    ) -> list:
        """Set every key of ``items`` in the local store, send its changelog
        record (keyed and serialised as faust's own path does), then the
        ``caused`` records (topic, key, value, partition), all through
        ``producer`` in one batch per partition (``Producer.send_many``).
        Returns the delivery futures; a changelog batch's marks its last
        offset as persisted in the store when it completes (what faust's
        changelog callback does per record, so a restart replays only the
        changelog past it).

        Writers send one at a time, in the order their values were set
        (asyncio.Lock is FIFO): a key's last changelog record is its value, and
        the records a write caused never overtake those of an earlier write."""
        key_bytes, value_bytes = self.key_bytes, self.value_bytes
        partition_for_key = self.partition_for_key
        name = self.changelog_topic.get_topic_name()
        changelog = [
            (name, key_bytes(key), value_bytes(value), partition_for_key(key))
            for key, value in items.items()
        ]
        # Every key in the store before the first await: another task that reads
        # one of them afterwards sees the new value.
        store = self.data
        if isinstance(store, KeyPartitionedRocksDB):
            store.put_many((partition, key, value) for _, key, value, partition in changelog)
        else:
            for key, value in items.items():
                store[key] = value
        async with self._send_order:
            batches = await producer.send_many(changelog)
            for batch in batches:
                batch.future.add_done_callback(lambda _, batch=batch: self._persisted(batch))
            batches += await producer.send_many(caused)
        return [batch.future for batch in batches]

    def values_of(self, keys: Iterable[str]) -> dict[str, bytes | None]:
        """The stored value of each of ``keys`` (None: not set), as
        ``table.get`` returns it, read from the store directly."""
        store = self.data
        if isinstance(store, KeyPartitionedRocksDB):
            return store.values_of(keys)
        return {key: store.get(key) for key in keys}

    @functools.cached_property
    def key_bytes(self) -> Callable[[str], bytes]:
        """A key serialised as faust serialises it for the changelog and the
        store. faust's JSON serialiser (stdlib's or orjson's) writes a key of
        printable ASCII without a quote or backslash as itself in quotes; any
        other key, or another serialiser, goes through faust's own path."""
        faust_path = functools.partial(
            self.app.serializers.dumps_key, self.key_type, serializer=self.key_serializer
        )
        if any(_quoted(key) != faust_path(key) for key in PLAIN_KEYS):
            return faust_path

        def key_bytes(key: str) -> bytes:
            if key.isascii() and key.isprintable() and '"' not in key and "\\" not in key:
                return _quoted(key)
            return faust_path(key)

        return key_bytes

    @functools.cached_property
    def value_bytes(self) -> Callable[[bytes], bytes]:
        """A value serialised as faust does: itself for the raw serialiser."""
        if self.value_serializer == "raw":
            return _unchanged
        return functools.partial(
            self.app.serializers.dumps_value, self.value_type, serializer=self.value_serializer
        )

    def prefix_values(self, partition: int, prefix: str) -> Iterator[bytes]:
        """The values of the keys of ``partition`` that start with ``prefix``.
        A RocksDB store reads that partition's database from the prefix on,
        under RocksDB's implicit snapshot (the reader may yield to the event
        loop while the table is written); another store lists the keys first."""
        if isinstance(self.data, KeyPartitionedRocksDB) and self.data.use_rocksdict:
            return self.data.prefix_values(partition, prefix)
        keys = [key for key in list(self.keys()) if key.startswith(prefix)]
        return (value for key in keys if (value := self.get(key)))

    def partition_keys(self, partition: int) -> Iterator[str]:
        """The keys of ``partition`` in the local store as of this call: a
        RocksDB store lists that partition's database under a snapshot taken
        now (keys set afterwards are not listed; the caller may yield to the
        event loop between keys); another store lists its keys first. Never
        ``len(table)`` or ``table.keys()`` on a large RocksDB table: faust
        counts by reading every key of every partition (~1 s per 100k
        patients' records)."""
        if isinstance(self.data, KeyPartitionedRocksDB) and self.data.use_rocksdict:
            return self.data.partition_keys(partition)
        keys = [key for key in list(self.keys()) if self.partition_for_key(key) == partition]
        return iter(keys)

    @property
    def _send_order(self) -> asyncio.Lock:
        lock = self.__dict__.get("_send_lock")
        if lock is None:
            lock = self.__dict__["_send_lock"] = asyncio.Lock()
        return lock

    def _persisted(self, batch: SentBatch) -> None:
        future = batch.future
        if future.cancelled() or future.exception() is not None:
            return  # the caller's await of the future raises
        self.data.set_persisted_offset(TP(batch.topic, batch.partition), batch.last_offset)

    def _new_store_by_url(self, url: str | URL) -> Any:
        if URL(str(url)).scheme != "rocksdb":
            return super()._new_store_by_url(url)
        return KeyPartitionedRocksDB(
            url,
            self.app,
            self,
            table_name=self.name,
            key_type=self.key_type,
            key_serializer=self.key_serializer,
            value_serializer=self.value_serializer,
            value_type=self.value_type,
            loop=self.loop,
            options=self.options,
        )


class KeyPartitionedRocksDB(rocksdb.Store):
    """faust's RocksDB store, with each key in its own partition's database
    (``table.partition_for_key``) instead of the current event's."""

    table: PartitionedByKey

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Revoked partitions whose database handle outlived the revocation.
        self._lingering: set[int] = set()

    def _partition(self, key: bytes) -> int:
        """The partition of a key as the store holds it (serialised)."""
        return self.table.partition_for_key(self._decode_key(key))

    def _set(self, key: bytes, value: bytes | None) -> None:
        partition = self._partition(key)
        self._key_index[key] = partition
        self._db_for_partition(partition).put(key, value)

    def _get(self, key: bytes) -> bytes | None:
        partition = self._partition(key)
        value = self._db_for_partition(partition).get(key)
        if value is not None:
            self._key_index[key] = partition
        return value

    def _contains(self, key: bytes) -> bool:
        return self._get(key) is not None

    def values_of(self, keys: Iterable[str]) -> dict[str, bytes | None]:
        """PartitionedByKey.values_of: each key read from its partition's database."""
        partition_for_key, key_bytes = self.table.partition_for_key, self.table.key_bytes
        return {
            key: self._db_for_partition(partition_for_key(key)).get(key_bytes(key)) for key in keys
        }

    def put_many(self, rows: Iterable[tuple[int, bytes, bytes]]) -> None:
        """Put (partition, serialised key, value) rows, one write batch per
        partition's database."""
        if not self.use_rocksdict:
            for partition, key, value in rows:
                self._db_for_partition(partition).put(key, value)
            return
        batches: dict[int, Any] = {}
        for partition, key, value in rows:
            batch = batches.get(partition)
            if batch is None:
                batch = batches[partition] = rocksdb.rocksdict.WriteBatch(raw_mode=True)
            batch.put(key, value)
        for partition, batch in batches.items():
            self._db_for_partition(partition).write(batch)

    def revoke_partitions(self, table: Any, tps: set[TP]) -> None:
        """Drop the databases of ``tps`` (faust's, without its full garbage
        collection on every rebalance). faust collects so that a dropped
        database's RocksDB lock is released before the partition can come
        back; it collected even with nothing revoked, twice per rebalance (one
        per table), which blocked the event loop ~0.4 s each at 20k patients
        and ~1 s at 100k, in a standby's takeover. Reference counting releases
        a dropped database at once; a handle still referenced elsewhere (an
        iterator, a reference cycle) is noted, and collected once when its
        partition is opened again (``_open_for_partition``)."""
        for tp in tps:
            if tp.topic in table.changelog_topic.topics:
                db = self._dbs.pop(tp.partition, None)
                # references: the local name and getrefcount's argument
                if db is not None and sys.getrefcount(db) > 2:
                    self._lingering.add(tp.partition)
                del db

    def _open_for_partition(self, partition: int) -> Any:
        if partition in self._lingering:
            self._lingering.discard(partition)
            gc.collect()  # its earlier handle, if a reference cycle keeps it
        return super()._open_for_partition(partition)

    def set_persisted_offset(self, tp: TP, offset: int) -> None:
        """Record the changelog offset written, in the partition's database if
        it is open: a delivery that completes after a rebalance took the
        partition away, or after the store stopped, must not open it again
        (faust's would, and hold its lock; the next owner replays from its own
        offset)."""
        db = self._dbs.get(tp.partition)
        if db is not None:
            db.put(self.offset_key, str(offset).encode())

    def partition_keys(self, partition: int) -> Iterator[str]:
        """PartitionedByKey.partition_keys: the partition's database under a snapshot."""
        snapshot = self._db_for_partition(partition).snapshot()
        offset_key = self.offset_key
        keys = snapshot.keys()  # a Snapshot is not iterable itself
        return (self._decode_key(key) for key in keys if key != offset_key)

    def prefix_values(self, partition: int, prefix: str) -> Iterator[bytes]:
        """PartitionedByKey.prefix_values: a seek to the prefix in the
        partition's database, not a scan of every key of every partition
        (the population table holds every measure's evidence)."""
        # faust's table keys are JSON strings: the serialised prefix, unclosed
        raw_prefix = json.dumps(prefix).encode()[:-1]
        db = self._db_for_partition(partition)
        for key, value in db.items(from_key=raw_prefix):
            if not key.startswith(raw_prefix):
                break
            if value is not None:
                yield value


class KeyCounts:
    """How many keys a PartitionedByKey table holds in each of some partitions,
    kept exact without reading the table on every write: each partition is
    counted once (``count``, when it becomes one of the worker's), and new keys
    are added as the only writer of those partitions sets them (``added``)."""

    def __init__(self, partition_of: Callable[[str], int]) -> None:
        self.partition_of = partition_of
        self.counts: dict[int, int] = {}
        self._counting: dict[int, int] = {}  # keys added since a count's snapshot

    def added(self, keys: Iterable[str]) -> None:
        """``keys`` were set for the first time."""
        for key in keys:
            partition = self.partition_of(key)
            if partition in self.counts:
                self.counts[partition] += 1
            elif partition in self._counting:
                self._counting[partition] += 1

    async def count(self, table: PartitionedByKey, partitions: Iterable[int], chunk: int) -> None:
        """Count the keys of each of ``partitions`` not counted yet, ``chunk``
        keys at a time between yields to the event loop; forget every other
        partition (no longer the worker's: its count would go stale)."""
        wanted = set(partitions)
        for partition in set(self.counts) - wanted:
            del self.counts[partition]
        for partition in sorted(wanted - set(self.counts)):
            self._counting[partition] = 0  # from the snapshot on, no await in between
            keys, found = table.partition_keys(partition), 0
            try:
                while step := sum(1 for _ in itertools.islice(keys, chunk)):
                    found += step
                    await asyncio.sleep(0)
            finally:
                since = self._counting.pop(partition)
            self.counts[partition] = found + since

    def forget(self) -> None:
        """Count every partition again (its keys may have been set elsewhere)."""
        self.counts.clear()

    def total(self, partitions: Iterable[int]) -> int | None:
        """Keys of ``partitions``; None until each of them is counted."""
        counts = [self.counts.get(p) for p in partitions]
        return None if None in counts else sum(counts)
