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

A measure's evidence (the population-evidence topic and the population agent's
table) has a partition of its own, EvidencePartitions: the measures of a joint
group share their group's, so the one worker that owns it holds every book the
group's fit needs.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

from aiokafka.partitioner import DefaultPartitioner

if TYPE_CHECKING:
    from streams.catalogue import Catalogue, JointGroupSpec

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


#: The posterior topic's key prefix of a joint group's posterior (a measure's
#: posterior is keyed by the measure's name).
JOINT_KEY_PREFIX = "joint:"


def posterior_key(group: str) -> str:
    """The name of a joint group on Kafka: the key of its posterior on the
    population-posterior topic, and what its measures' evidence partition is
    the hash of (EvidencePartitions)."""
    return f"{JOINT_KEY_PREFIX}{group}"


class EvidencePartitions:
    """The population-evidence partition of each measure, the same in every
    process with the same catalogue: ``crc32(name) mod partitions``, where the
    name is the measure's own, or its joint group's ``posterior_key`` for a
    measure of a joint group (every measure of a group on one partition, so on
    one worker, the group's fit's). A measure the catalogue does not know (a
    table key of a measure since removed) has its own name's.

    Every user of a measure's evidence partition asks this: the patients step
    sending EvidenceBatch messages, the population agent's ownership and its
    table's changelog partition and store."""

    def __init__(self, partitions: int, joint: Iterable[JointGroupSpec]) -> None:
        self.partitions = partitions
        self._group_of = {measure: group.name for group in joint for measure in group.measures}
        self._known: dict[str, int] = {}

    @classmethod
    def of(cls, catalogue: Catalogue, partitions: int) -> EvidencePartitions:
        return cls(partitions, catalogue.joint)

    def __call__(self, measure: str) -> int:
        partition = self._known.get(measure)
        if partition is None:
            group = self._group_of.get(measure)
            name = measure if group is None else posterior_key(group)
            partition = self._known[measure] = zlib.crc32(name.encode()) % self.partitions
        return partition
