"""Where records go: the partition of a patient's records and of a measure's
evidence, the same in every process.

Producers key every raw record by patient id, and Kafka's Java client (and
aiokafka, and faust) put a keyed record on ``murmur2(key) mod partitions``: the
worker relies on that to find a patient's records, table partition and
changelog on one worker. librdkafka clients (confluent-kafka, Go, Node's
node-rdkafka, .NET) default to another hash (``consistent_random``, CRC32):
their records land elsewhere unless they set ``partitioner=murmur2_random``.
The patients agent checks every keyed record's partition on arrival and
re-routes a misplaced one (streams.patient_step).
"""

from __future__ import annotations

import functools
import zlib

from aiokafka.partitioner import DefaultPartitioner

_MURMUR2 = DefaultPartitioner()
KEY_PARTITIONS_KEPT = 1 << 15  # keys (~7 MB at most with 13-byte keys)


@functools.lru_cache(maxsize=KEY_PARTITIONS_KEPT)
def key_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2, as in the Java client and
    aiokafka) gives ``key``: where the patient's events land on every topic.

    Remembered for the KEY_PARTITIONS_KEPT most recently used keys: the patients
    agent asks for the key of every raw record it reads, a patient's readings
    come again and again, and aiokafka's murmur2 is pure Python (~5 us a key,
    as much as the rest of a record's routing). A miss costs what every call
    did."""
    all_partitions = list(range(partitions))
    return _MURMUR2(key, all_partitions, all_partitions)


def measure_partition(measure: str, partitions: int) -> int:
    """The population-evidence partition of a measure (stable across processes)."""
    return zlib.crc32(measure.encode()) % partitions
