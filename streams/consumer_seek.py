"""A fix for records skipped after a rebalance by partitions with no committed offset.

Faust (``Recovery``, after every rebalance) clears the events its fetcher has
already prefetched and then "seeks stream partitions to committed offsets" so
that they are fetched again (faust-streaming issues 216 and 221).
``AIOKafkaConsumer.seek_to_committed`` only seeks a partition whose committed
offset is positive: for a partition with *no* committed offset (a new consumer
group, a partition nobody has committed yet) or offset 0, the fetch position
stays where the prefetch left it, and the cleared events are never delivered.

We saw exactly that on the real broker (tests/test_reliability.py): a worker
joining while records flowed lost the first 24 enrolments of a partition, whose
readings then waited forever for an enrolment. The group's offsets were all
committed to the end; the records were simply never processed.

``install`` wraps ``seek_to_committed`` so that such partitions are reset to
their beginning, which is what ``auto_offset_reset="earliest"`` (faust's
default) means for a partition without a committed offset. Events processed
before without a commit are then delivered again; the pipeline recognises
replays (streams.patient_state), so nothing is counted twice. Changelog
partitions are left alone: faust positions those itself during recovery.
"""

from __future__ import annotations

import contextlib

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import IllegalStateError

_ORIGINAL = AIOKafkaConsumer.seek_to_committed


def _needs_reset(partition: TopicPartition, committed: int | None) -> bool:
    return not committed and not partition.topic.endswith("-changelog")


async def _seek_to_committed(self: AIOKafkaConsumer, *partitions: TopicPartition):
    committed = await _ORIGINAL(self, *partitions)
    assigned = self.assignment()  # a rebalance may have revoked some meanwhile
    reset = [tp for tp, offset in committed.items() if _needs_reset(tp, offset) and tp in assigned]
    if reset:
        # Revoked during the seek: the next assignment seeks again.
        with contextlib.suppress(IllegalStateError):
            await self.seek_to_beginning(*reset)
    return committed


def install() -> None:
    """Patch AIOKafkaConsumer.seek_to_committed (idempotent)."""
    AIOKafkaConsumer.seek_to_committed = _seek_to_committed


def installed() -> bool:
    return AIOKafkaConsumer.seek_to_committed is _seek_to_committed
