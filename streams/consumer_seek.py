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

A third, at the end of every recovery (``Recovery.on_recovery_completed``;
``_resume_streams`` in an app without tables): faust resumes the stream
partitions, *then* seeks them (a committed-offset request per partition),
*then* calls ``flow_control.resume()``, which clears every agent's queue and
the changelog reader's. In an app with tables flow control is running by then
(recovery resumed it to read the changelogs), so records fetched during the
seek are queued, and those an agent has not taken yet (it is busy with its
first batch, say) are dropped by the clear with the fetch position past them:
never delivered, and the partition's commit stuck below them. A CI run saw it
with two workers on RocksDB: the enrolments of a partition, published during
a worker's seek, were never applied, and its patients never scored.
tests/test_rebalance_recovery.py makes it happen on every run of stock faust.
``install`` replaces both: the stream partitions are seeked while still
paused and resumed only after, with no await before the flow resumes; the
queues are cleared only if flow control was stopped (nothing current is in
them then).
"""

from __future__ import annotations

import asyncio
import contextlib

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import IllegalStateError
from faust.tables.recovery import Recovery
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


async def _seek_then_resume_streams(
    recovery: Recovery, assignment: set, standbys_ready: bool
) -> None:
    """The end of a recovery, as faust's but for the order: seek the stream
    partitions while they are still paused, then resume them and the flow with
    no await in between, so nothing of them is fetched before the flow resumes;
    clear the queues (faust's ``flow_control.resume()``) only if flow control
    was stopped. ``standbys_ready``: whether the standby tables are ready too."""
    app = recovery.app
    consumer = app.consumer
    if assignment:
        recovery.log.info("Seek stream partitions to committed offsets.")
        await recovery._wait(consumer.perform_seek(), timeout=app.conf.broker_request_timeout)
        consumer.resume_partitions({tp for tp in assignment if not recovery._is_changelog_tp(tp)})
    recovery.completed.set()
    if not app.flow_control.is_active():
        app.flow_control.resume()
    consumer.resume_flow()
    await app._fetcher.maybe_start()
    recovery.tables.on_actives_ready()
    if standbys_ready:
        recovery.tables.on_standbys_ready()
    app.on_rebalance_end()
    recovery.log.info("Worker ready")


async def _resume_streams(self: Recovery, generation_id: int = 0) -> None:
    """faust 0.15.3's Recovery._resume_streams (an app without tables), with
    ``_seek_then_resume_streams``."""
    app = self.app
    await app.on_rebalance_complete.send()
    assignment = app.consumer.assignment()
    if app.consumer_generation_id != generation_id:
        self.log.warning("Recovery rebalancing again")
        return
    await _seek_then_resume_streams(self, assignment, standbys_ready=True)


async def _on_recovery_completed(self: Recovery, generation_id: int = 0) -> None:
    """faust 0.15.3's Recovery.on_recovery_completed (an app with tables),
    with ``_seek_then_resume_streams``."""
    app = self.app
    self.log.info("Restore complete!")
    await app.on_rebalance_complete.send()
    self._set_recovery_ended()
    completions = [
        asyncio.ensure_future(
            table.on_recovery_completed(
                self.actives_for_table[table], self.standbys_for_table[table]
            )
        )
        for table in self.tables.values()
    ]
    if completions:
        await asyncio.wait(completions)
    assignment = app.consumer.assignment()
    if app.consumer_generation_id != generation_id:
        self.log.warning(
            "Recovery rebalancing again app id %s param %s",
            app.consumer_generation_id, generation_id,
        )  # fmt: skip
        return
    await _seek_then_resume_streams(
        self, assignment, standbys_ready=not app.assignor.assigned_standbys()
    )


def install() -> None:
    """Patch AIOKafkaConsumer.seek_to_committed, faust's Consumer.ack and the
    end of Recovery (``_resume_streams``, ``on_recovery_completed``); idempotent."""
    AIOKafkaConsumer.seek_to_committed = _seek_to_committed
    Consumer.ack = _ack  # type: ignore[method-assign]
    Recovery._resume_streams = _resume_streams  # type: ignore[method-assign]
    Recovery.on_recovery_completed = _on_recovery_completed  # type: ignore[method-assign]


def installed() -> bool:
    return (
        AIOKafkaConsumer.seek_to_committed is _seek_to_committed
        and Consumer.ack is _ack
        and Recovery._resume_streams is _resume_streams
        and Recovery.on_recovery_completed is _on_recovery_completed
    )
