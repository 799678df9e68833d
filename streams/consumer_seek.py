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

A second loss, on partitions that *have* a committed offset: records fetched
before a rebalance and reaching the stream after it carry the old consumer
generation; faust's stream skips them, to be fetched again after the seek, but
acks them "so that the lag does not grow". The ack moves the committed offset
past records that were never processed, and the seek then starts after them.
tests/test_scale_out.py saw it on the real broker: a third worker joining
mid-stream left 1 and 19 readings of the partitions the old members kept
unprocessed, for good. ``install`` also wraps ``Consumer.ack`` so that a
message of an earlier generation is not acknowledged: it is delivered again
after the seek and recognised as a replay if it had been applied.
"""

from __future__ import annotations

import contextlib

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import IllegalStateError
from faust.transport.consumer import Consumer

_ORIGINAL = AIOKafkaConsumer.seek_to_committed
_ORIGINAL_ACK = Consumer.ack


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


def fetched_since_rebalance(app, message) -> bool:
    """Whether ``message`` was fetched in the app's current consumer generation.
    One fetched before the latest rebalance is neither acknowledged (``_ack``)
    nor applied by the agents: faust fetches it again from the committed offset,
    for whichever worker owns its partition now."""
    return message.generation_id == app.consumer_generation_id


def _ack(self: Consumer, message) -> bool:
    """Consumer.ack, except for a message fetched in an earlier consumer
    generation (before the latest rebalance): not acknowledged, so the offset
    commit cannot pass it; faust fetches it again from the committed offset."""
    if not fetched_since_rebalance(self.app, message):
        return False
    return _ORIGINAL_ACK(self, message)


def install() -> None:
    """Patch AIOKafkaConsumer.seek_to_committed and faust's Consumer.ack (idempotent)."""
    AIOKafkaConsumer.seek_to_committed = _seek_to_committed
    Consumer.ack = _ack  # type: ignore[method-assign]


def installed() -> bool:
    return AIOKafkaConsumer.seek_to_committed is _seek_to_committed and Consumer.ack is _ack
